"""Database engines and the append-only record log shared by both logs.

Choices made here (the architecture leaves them open):

* A URL is either a filesystem path (SQLite file, made absolute), ``sqlite:///PATH`` or a
  PostgreSQL URL; ``postgresql://`` and ``postgres://`` are driven by psycopg 3. Every process
  normalises database settings with :func:`database_url` (ReservationResource also lets through
  other dialects' URLs) and :func:`psycopg_url` (for psycopg itself).
* Every SQLite connection runs with ``journal_mode=WAL``, ``synchronous=FULL`` (a commit is on disk
  when it returns), ``busy_timeout=10000`` and ``foreign_keys=ON``. The pool is SQLAlchemy's
  ``QueuePool`` with ``check_same_thread=False``, so one engine serves many threads; SQLite
  serialises the writers and ``busy_timeout`` makes them wait instead of failing. The set-up is
  :func:`sqlite_setup`, which ReservationResource shares (with its own ``busy_timeout``, without
  ``foreign_keys`` and with ``BEGIN IMMEDIATE``).
* PostgreSQL engines use a pool of 5, with a 10 s connect timeout unless the URL names one. No
  ``pool_pre_ping``: it costs a round trip per batch; instead a log append that meets an outage
  (a dropped connection included: SQLAlchemy invalidates the pool on a disconnect) is retried a
  few times on a fresh connection, with the shared back-off of :mod:`runtime.outages`. A longer
  outage is the driver's to wait out.
  Tables this process fills are analyzed early (see :class:`AnalyzeSchedule`).
  Creating an engine never connects; :func:`check_connection` does, and turns a
  failure into a one-line :class:`ConfigurationError` (chained to its cause, so that an outage
  behind it is still recognised as one). :func:`configuration_problem` tells a setting that
  cannot work (a database that does not exist, a role refused) from a server that is down.
* :class:`RecordLog` writes each batch in one transaction (group commit). On PostgreSQL the
  batch is one ``INSERT ... SELECT FROM unnest(...)`` sent with its BEGIN and COMMIT in one
  round trip (:mod:`runtime.pgbatch`), and the look-up by ``tx_id`` is one query in autocommit.
  ``seq`` and ``written_at`` are assigned by the log, whatever the given rows carry. Every
  write is a plain INSERT or DELETE, so SQLite writers never upgrade a read lock.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import tenacity
from sqlalchemy import Engine, event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, make_url

from runtime import outages, pgbatch
from runtime.errors import ConfigurationError, LogMissing
from runtime.redaction import redact_url

log = logging.getLogger("twophase.store")

__all__ = [
    "LogRow",
    "RecordLog",
    "check_connection",
    "configuration_problem",
    "database_url",
    "make_engine",
    "psycopg_url",
    "sqlite_setup",
]

_CHUNK = 500
_TX_ID_MAX = 200
_KIND_MAX = 40
_APPEND_ATTEMPTS = 3


def pg_connect_args(parsed: URL) -> dict[str, Any]:
    """connect_args for a psycopg engine: a connect timeout unless the URL names one."""
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = 10
    return connect_args


class AnalyzeSchedule:
    """When to ANALYZE a table this process fills: after 2,000 rows written, then 8x as many...

    A young table has no statistics until autovacuum first gets to it (a minute or more), and
    until then PostgreSQL guesses that a lookup of a hundred tx ids matches half the table and
    scans all of it (the benchmark saw such lookups take 35 to 50 ms; a plan psycopg prepared
    while the table was empty kept scanning too). Growing tables are analyzed early, then ever
    more rarely; past a million rows, autovacuum alone keeps the statistics.
    """

    def __init__(self, first: int = 2_000, factor: int = 8, last: int = 1_000_000) -> None:
        self._next, self._factor, self._last = first, factor, last
        self._written = 0

    def wrote(self, rows: int) -> bool:
        """Count ``rows`` more; whether the table is due for ANALYZE now."""
        self._written += rows
        if self._written < self._next or self._next > self._last:
            return False
        while self._next <= self._written:
            self._next *= self._factor
        return True


def analyze_in_background(engine: Engine, table: sa.Table) -> None:
    """ANALYZE ``table`` on PostgreSQL, off the caller's thread: it takes tens of milliseconds,
    which a batch in flight should not wait for. SQLite plans these lookups well without it."""
    if engine.dialect.name != "postgresql":
        return

    def run() -> None:
        name = engine.dialect.identifier_preparer.format_table(table)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ANALYZE {name}")
        except sa.exc.SQLAlchemyError as exc:  # statistics are an optimisation only
            log.info("ANALYZE %s failed: %s", name, _first_line(exc))

    threading.Thread(target=run, name=f"analyze-{table.name}", daemon=True).start()


def in_ids(
    column: sa.ColumnElement[str], dialect: str, name: str = "ids"
) -> sa.ColumnElement[bool]:
    """``column IN :name`` for a statement built once: on PostgreSQL ``column = ANY(:name)``.

    An IN list makes a new statement text for every batch size, parsed and converted again
    by psycopg and by the server; the array form is one statement for all sizes.
    """
    if dialect != "postgresql":
        return column.in_(sa.bindparam(name, expanding=True))
    return column == sa.any_(sa.bindparam(name, type_=postgresql.ARRAY(sa.String())))


def commit(conn: sa.Connection) -> None:
    """Commit ``conn``'s transaction; on PostgreSQL with its deferred writes in one round trip."""
    if pgbatch.is_postgres(conn):
        pgbatch.commit(conn)
    else:
        conn.commit()


_POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
_PSYCOPG_PREFIX = "postgresql+psycopg://"


def database_url(value: str, *, any_dialect: bool = False) -> str:
    """Normalise a database setting to a SQLAlchemy URL string (see the module docstring).

    The one normalisation of database settings: the logs, both resources and the tools use it.
    A file path becomes ``sqlite:///ABSOLUTE-PATH``; ``postgresql://``, ``postgres://`` and
    ``postgresql+psycopg://`` become ``postgresql+psycopg://`` (psycopg 3). Anything else is a
    :class:`ConfigurationError`, unless ``any_dialect`` (ReservationResource, which works on any
    database SQLAlchemy has a dialect for): then a URL of another scheme is left as it is for
    SQLAlchemy to judge, and so is a PostgreSQL URL without a host (libpq's defaults).
    """
    text = value.strip()
    unsupported = ConfigurationError(
        f"unsupported database URL {redact_url(value)!r}: "
        "use a file path, sqlite:///PATH or postgresql://USER@HOST/DB"
    )
    if not text:
        raise unsupported
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme == "sqlite":
        return f"sqlite://{rest}"
    if scheme in _POSTGRES_SCHEMES and (rest or any_dialect):
        return f"{_PSYCOPG_PREFIX}{rest}"
    if any_dialect:
        return text
    raise unsupported


def psycopg_url(value: str) -> str:
    """``value`` as ``psycopg.connect`` takes it: a PostgreSQL URL in any spelling
    :func:`database_url` accepts, as ``postgresql://`` (without SQLAlchemy's ``+psycopg``); a
    libpq connection string (``host=H dbname=D``, no ``://``) as it is."""
    if "://" not in value:
        return value
    url = database_url(value, any_dialect=True)
    if url.startswith(_PSYCOPG_PREFIX):
        return "postgresql://" + url.removeprefix(_PSYCOPG_PREFIX)
    return url


def _redacted(url: URL) -> str:
    return redact_url(url.render_as_string(hide_password=False))


def sqlite_setup(
    engine: Engine,
    *,
    busy_timeout_ms: int = 10_000,
    foreign_keys: bool = True,
    begin_immediate: bool = False,
) -> None:
    """Set up every connection ``engine`` opens to SQLite: ``journal_mode=WAL``,
    ``synchronous=FULL`` (a commit is on disk when it returns), ``busy_timeout`` (a writer waits
    for the others instead of failing) and, with ``foreign_keys``, ``foreign_keys=ON``.

    With ``begin_immediate`` every transaction starts with ``BEGIN IMMEDIATE``, emitted here in
    place of the driver's own deferred BEGIN (turned off with ``isolation_level = None``): it
    holds the write lock from its first statement, so a check-then-write in it is serializable
    (ReservationResource).
    """

    def on_connect(dbapi_connection: Any, _connection_record: Any) -> None:
        if begin_immediate:
            dbapi_connection.isolation_level = None  # BEGIN is emitted by on_begin
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL").fetchall()
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            if foreign_keys:
                cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    def on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "connect", on_connect)
    if begin_immediate:
        event.listen(engine, "begin", on_begin)


def make_engine(url: str) -> Engine:
    """Create an engine for ``url`` (normalised by :func:`database_url`); does not connect."""
    parsed = make_url(database_url(url))
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            parent = Path(database).expanduser().parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot create directory {str(parent)!r} for the SQLite database: "
                    f"{exc.strerror or exc}"
                ) from exc
        engine = sa.create_engine(parsed)
        sqlite_setup(engine)
        return engine
    return pgbatch.create_engine(parsed, pool_size=5, connect_args=pg_connect_args(parsed))


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc`` (of the driver's error behind it), URLs redacted."""
    cause: BaseException = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return redact_url(lines[0]) if lines else type(cause).__name__


#: invalid_catalog_name, invalid_authorization_specification, invalid_password
_CONFIG_SQLSTATES = frozenset({"3D000", "28000", "28P01"})
#: the same refusals as libpq words them when a connection fails (psycopg gives no SQLSTATE
#: then), and settings libpq or SQLite cannot use at all
_CONFIG_MESSAGES = re.compile(
    r'database "[^"]*" does not exist|role "[^"]*" does not exist'
    r"|password authentication failed|no pg_hba\.conf entry|invalid connection option"
    r'|invalid (?:integer|port|sslmode) value|invalid value for parameter "'
    r"|unable to open database file",
    re.IGNORECASE,
)


def configuration_problem(exc: BaseException) -> str | None:
    """What in ``exc`` says a setting cannot work (``database "x" does not exist``), or None.

    For start-up, which waits for a server that is down but must end at once when the database
    named does not exist or refuses the role: both are connection failures to the driver (and
    :func:`runtime.outages.outage_cause` counts them as outages), only the server's words
    tell them apart. The words are the driver's own, of the innermost error that has them.
    """
    found: str | None = None
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        text = _first_line(link)
        if getattr(link, "sqlstate", None) in _CONFIG_SQLSTATES or _CONFIG_MESSAGES.search(text):
            found = text.rpartition("FATAL:")[2].strip()
        link = link.__cause__ or link.__context__
    return found


def check_connection(engine: Engine) -> None:
    """Connect once; raise :class:`ConfigurationError` with a one-line reason if that fails."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        raise ConfigurationError(
            f"cannot connect to database {_redacted(engine.url)}: {_first_line(exc)}"
        ) from exc


def open_existing(url: str, table: str) -> Engine:
    """An engine on ``url`` where ``table`` already exists; creates no file, directory or table.

    For readers such as ``twophase tx``: :func:`make_engine` and :class:`RecordLog` create what
    is missing, so a mistyped path would read as an empty log, which is a false all-clear.
    """
    parsed = make_url(database_url(url))
    database = parsed.database or ""
    if (
        parsed.get_backend_name() == "sqlite"
        and database not in ("", ":memory:")
        and not database.startswith("file:")
        and not Path(database).expanduser().is_file()
    ):
        raise LogMissing(f"no log at {database}: the file does not exist")
    engine = make_engine(url)
    try:
        check_connection(engine)
        try:
            found = sa.inspect(engine).has_table(table)
        except sa.exc.SQLAlchemyError as exc:
            raise ConfigurationError(
                f"cannot read database {_redacted(engine.url)}: {_first_line(exc)}"
            ) from exc
        if not found:
            raise LogMissing(f"no log in {_redacted(engine.url)}: table {table} does not exist")
    except BaseException:
        engine.dispose()
        raise
    return engine


@dataclass(frozen=True)
class LogRow:
    """One durable record: ``seq`` and ``written_at`` are filled in by the log."""

    tx_id: str
    kind: str
    body: bytes
    seq: int = 0
    written_at: float = 0.0


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _unique(tx_ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(tx_ids))


def _params(rows: Sequence[LogRow]) -> list[dict[str, Any]]:
    now = time.time()
    params = []
    for row in rows:
        if not row.tx_id or len(row.tx_id) > _TX_ID_MAX:
            raise ValueError(f"tx_id must be 1..{_TX_ID_MAX} characters: {row.tx_id!r}")
        if not row.kind or len(row.kind) > _KIND_MAX:
            raise ValueError(f"kind must be 1..{_KIND_MAX} characters: {row.kind!r}")
        params.append(
            {"tx_id": row.tx_id, "kind": row.kind, "body": bytes(row.body), "written_at": now}
        )
    return params


class RecordLog:
    """Append-only durable log of (tx_id, kind, body) rows in one table."""

    def __init__(self, engine: Engine, table: str) -> None:
        self.engine = engine
        self.flushes = 0
        self.rows_written = 0
        self._lock = threading.Lock()
        self._analyze = AnalyzeSchedule()
        self._rows_for_query: sa.Select[Any] | None = None
        metadata = sa.MetaData()
        self.table = sa.Table(
            table,
            metadata,
            sa.Column(
                "seq",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                primary_key=True,
                autoincrement=True,
            ),
            sa.Column("tx_id", sa.String(_TX_ID_MAX), nullable=False, index=True),
            sa.Column("kind", sa.String(_KIND_MAX), nullable=False),
            sa.Column("body", sa.LargeBinary(), nullable=False),
            sa.Column("written_at", sa.Float(), nullable=False),
        )
        metadata.create_all(engine, checkfirst=True)

    def probe(self) -> None:
        """Return when the log's database answers; raise when it does not (outage checks)."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def append(self, rows: Sequence[LogRow]) -> None:
        """Write ``rows`` in one transaction; they are durable when this returns. On PostgreSQL
        the BEGIN, the INSERT and the COMMIT travel in one round trip."""
        if not rows:
            return
        params = _params(rows)
        # A connection the server dropped (restart, idle kill) is retried on a fresh one. If
        # the commit itself was lost in flight the rows may be written twice, which the readers
        # tolerate: records are facts, and a repeated fact changes nothing.
        retrying = outages.retrying(
            stop=tenacity.stop_after_attempt(_APPEND_ATTEMPTS),
            what=f"appending {len(params)} records to {self.table.name}",
        )
        retrying(self._append_once, params)
        self._count(len(rows))

    def _append_once(self, params: list[dict[str, Any]]) -> None:
        with self.engine.connect() as conn:
            self._write(conn, params)
            commit(conn)

    def append_in(self, conn: sa.Connection, rows: Sequence[LogRow]) -> None:
        """Write ``rows`` in ``conn``'s open transaction, which the caller then commits (on
        PostgreSQL the INSERT is deferred to the commit: see :mod:`runtime.pgbatch`).

        For a participant whose resource lives in the same database: its branches and their
        records become durable in one commit. A failed commit loses both, never one of them.
        """
        if rows:
            self._write(conn, _params(rows))
            self._count(len(rows))

    def _count(self, rows: int) -> None:
        with self._lock:
            self.flushes += 1
            self.rows_written += rows
            due = self._analyze.wrote(rows)
        if due:
            analyze_in_background(self.engine, self.table)

    def _write(self, conn: sa.Connection, params: list[dict[str, Any]]) -> None:
        """Insert ``params`` in ``conn``'s transaction: on PostgreSQL deferred to its commit."""
        if not pgbatch.is_postgres(conn):
            conn.execute(sa.insert(self.table), params)
            return
        statement = pgbatch.insert_rows(
            conn.dialect.identifier_preparer.format_table(self.table),
            {"tx_id": "text", "kind": "text", "body": "bytea", "written_at": "float8"},
            [(p["tx_id"], p["kind"], p["body"], p["written_at"]) for p in params],
        )
        pgbatch.defer(conn, statement)

    @staticmethod
    def _row(record: Sequence[Any]) -> LogRow:
        """A row of the table's columns, in their order (``select(table)``, or the same list)."""
        seq, tx_id, kind, body, written_at = record
        return LogRow(tx_id, kind, bytes(body), int(seq), float(written_at))

    def _grouped(self, records: Iterable[Any], into: dict[str, list[LogRow]]) -> None:
        for record in records:
            row = self._row(record)
            into.setdefault(row.tx_id, []).append(row)

    def _rows_for(self, conn: sa.Connection) -> sa.Select[Any]:
        if self._rows_for_query is None:
            t = self.table
            where = in_ids(t.c.tx_id, conn.dialect.name)
            self._rows_for_query = sa.select(t).where(where).order_by(t.c.seq)
        return self._rows_for_query

    def rows_for(self, tx_ids: Iterable[str]) -> dict[str, list[LogRow]]:
        """Rows of the given tx ids, each list ordered by seq; ids without rows are absent.

        The coordinator reads this for every new ``tx_id`` (is it a resubmission?): on
        PostgreSQL the query skips SQLAlchemy and goes out as a libpq query of its own."""
        found: dict[str, list[LogRow]] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(_unique(tx_ids)):
                self._grouped(self._rows_of(conn, list(chunk)), found)
        return found

    def _rows_of(self, conn: sa.Connection, tx_ids: list[str]) -> Iterable[Sequence[Any]]:
        if not pgbatch.is_postgres(conn):
            return conn.execute(self._rows_for(conn), {"ids": tx_ids})
        table = conn.dialect.identifier_preparer.format_table(self.table)
        sql = (
            f"SELECT seq, tx_id, kind, body, written_at FROM {table}"
            " WHERE tx_id = ANY(%s) ORDER BY seq"
        )
        return pgbatch.read(conn, sql, (tx_ids,))

    def unfinished(self, finished_kinds: Collection[str]) -> dict[str, list[LogRow]]:
        """All rows of every tx id that has no row whose kind is in ``finished_kinds``.

        Tx ids appear in the order of their first row; each list is ordered by seq.
        """
        t = self.table
        finished = sa.select(t.c.tx_id).where(t.c.kind.in_(list(finished_kinds)))
        query = sa.select(t).where(t.c.tx_id.not_in(finished)).order_by(t.c.seq)
        found: dict[str, list[LogRow]] = {}
        with self.engine.connect() as conn:
            self._grouped(conn.execute(query), found)
        return found

    def rows_of_kind_since(self, kind: str, since: float) -> list[LogRow]:
        """Rows of ``kind`` written at or after ``since`` (epoch seconds), ordered by seq."""
        t = self.table
        query = sa.select(t).where(t.c.kind == kind, t.c.written_at >= since).order_by(t.c.seq)
        with self.engine.connect() as conn:
            return [self._row(r) for r in conn.execute(query)]

    def tx_ids(self, *, limit: int = 1000, offset: int = 0) -> list[str]:
        """Distinct tx ids, most recent (highest seq) first."""
        t = self.table
        query = (
            sa.select(t.c.tx_id)
            .group_by(t.c.tx_id)
            .order_by(sa.func.max(t.c.seq).desc())
            .limit(limit)
            .offset(offset)
        )
        with self.engine.connect() as conn:
            return [str(tx_id) for tx_id in conn.execute(query).scalars()]

    def prune(self, tx_ids: Iterable[str]) -> int:
        """Delete every row of these tx ids in one transaction; return the number deleted."""
        t = self.table
        ids = _unique(tx_ids)
        if not ids:
            return 0
        deleted = 0
        with self.engine.begin() as conn:
            for chunk in _chunks(ids):
                deleted += conn.execute(sa.delete(t).where(t.c.tx_id.in_(chunk))).rowcount
        return deleted

    def prune_finished_before(
        self,
        finished_kinds: Collection[str],
        before: float,
        *,
        only_kinds: Collection[str] | None = None,
    ) -> int:
        """Delete every row of tx ids having a row of a finished kind written before ``before``.

        ``before`` is in epoch seconds (``time.time()``). With ``only_kinds``, only rows of those
        kinds go (a participant keeps its compact "done" markers longer than the bulky records).
        Returns the number of rows deleted.
        """
        t = self.table
        if not finished_kinds:
            return 0
        done = sa.select(t.c.tx_id).where(
            t.c.kind.in_(list(finished_kinds)), t.c.written_at < before
        )
        condition: sa.ColumnElement[bool] = t.c.tx_id.in_(done)
        if only_kinds is not None:
            condition = sa.and_(condition, t.c.kind.in_(list(only_kinds)))
        with self.engine.begin() as conn:
            return conn.execute(sa.delete(t).where(condition)).rowcount

    def count(self) -> int:
        """Number of rows in the log."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(self.table)).scalar_one()
            )
