"""Fewer round trips to PostgreSQL: a transaction's statements in one psycopg pipeline.

On a machine whose cores are shared by the broker, the database and every service, each round
trip wakes the server and then the client, and a participant's batch spends most of its wall
time waiting (measured at 300/s: 8 ms to handle a batch for 3 ms of its own CPU). So the hot
statements go to the psycopg connection under the SQLAlchemy one, in psycopg's pipeline mode
(``Connection.pipeline()``), prepared on the server (``prepare=True``; a connection whose
``prepare_threshold`` is None, as behind a transaction-pooling PgBouncer, prepares nothing).
Counted in libpq's trace (tests/integration/test_pgbatch.py): a log append is one round trip,
and a participant's batch of prepares, or of commits, takes three (BEGIN with the first query,
the operation's handler, the writes with the COMMIT). psycopg sends each statement of a pipeline
as it is queued; a hand-written libpq loop that wrote the whole pipeline at once measured no
consistent gain over it (docs/performance.md), so the library's pipeline is the one used.

Explicit transactions. psycopg begins a transaction by itself, with a round trip of its own
(in pipeline mode it syncs after the BEGIN, to learn the new status), and its commit inside a
pipeline syncs once more before the pipeline's own closing sync. So the engines made here run
psycopg in autocommit and the transaction is ours: its BEGIN travels with its first statement
and its COMMIT with its last writes. A guard keeps SQLAlchemy's meaning: a statement run while
SQLAlchemy holds a transaction first opens one on the server (see :func:`create_engine`).

* :func:`fetch` sends a query together with the BEGIN that opens the transaction (one round
  trip instead of two);
* :func:`defer` keeps a write until the next :func:`flush` or :func:`commit`, which send the
  writes and the COMMIT in one round trip (a transaction that has not begun on the server
  sends its BEGIN with them); a plain ``Connection.commit()`` flushes them as well (a
  ``commit`` event), and a rollback drops them, so a deferred write is never silently lost nor
  left over for the connection's next user. A commit is durable when the call returns: the
  pipeline's closing sync waits for the COMMIT's answer, and an error in it is raised.

Errors are psycopg's own (by SQLSTATE), raised as SQLAlchemy's, so :mod:`runtime.outages`
tells an outage from an answer as for any statement SQLAlchemy runs.

:func:`insert_rows` builds one ``INSERT ... SELECT FROM unnest(...)`` for a batch of rows: one
statement whatever the batch size, rows in the given order. COPY would cost two round trips and
is not allowed in a pipeline. Everything here is for the ``postgresql`` dialect only.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, cast

import psycopg
import sqlalchemy as sa

__all__ = [
    "commit",
    "create_engine",
    "defer",
    "discard",
    "fetch",
    "flush",
    "insert_rows",
    "is_postgres",
    "read",
]

#: Connection.info key of the deferred writes: [(sql, params), ...]
_DEFERRED = "twophase.deferred_writes"
_engines_listened: weakref.WeakSet[sa.Engine] = weakref.WeakSet()
_IDLE = psycopg.pq.TransactionStatus.IDLE

Statement = tuple[str, Sequence[Any]]


def is_postgres(conn: sa.Connection) -> bool:
    return conn.dialect.name == "postgresql"


def create_engine(url: sa.URL, **options: Any) -> sa.Engine:
    """A psycopg engine whose transactions are explicit: psycopg runs in autocommit, the BEGIN
    travels with the first statement of a transaction, and SQLAlchemy's transactions keep their
    meaning (a statement run in one opens it on the server first). A connection set to
    ``isolation_level="AUTOCOMMIT"`` by its caller really runs each statement on its own."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", **options)
    sa.event.listen(engine, "before_cursor_execute", _begin_before)
    _listen(engine)
    return engine


def _begin_before(conn: sa.Connection, *_statement: Any) -> None:
    """A statement SQLAlchemy runs in a transaction that the server has not begun: begin it."""
    if conn.in_transaction() and conn.get_execution_options().get("isolation_level") is None:
        driver = _driver(conn)
        if _opens_transaction(driver):
            with _as_sqlalchemy_errors(conn, "BEGIN"):
                driver.execute("BEGIN")


def _opens_transaction(driver: psycopg.Connection[Any]) -> bool:
    """Whether the next statement must send the BEGIN itself (psycopg sends it, with a round
    trip of its own, unless in autocommit)."""
    return bool(driver.autocommit) and driver.pgconn.transaction_status == _IDLE


def insert_rows(table: str, columns: dict[str, str], rows: Sequence[Sequence[Any]]) -> Statement:
    """One INSERT of ``rows`` (at least one) into ``table`` (quoted by the caller); ``columns``
    maps each column to its PostgreSQL type. Rows keep their order (``seq`` columns follow it)."""
    names = list(columns)
    arrays = ", ".join(f"%b::{kind}[]" for kind in columns.values())
    aliases = ", ".join(f"c{i}" for i in range(len(names)))
    sql = (
        f"INSERT INTO {table} ({', '.join(names)}) SELECT {aliases} FROM unnest({arrays})"
        f" WITH ORDINALITY AS u({aliases}, position) ORDER BY position"
    )
    return sql, [list(column) for column in zip(*rows, strict=True)]


def _driver(conn: sa.Connection) -> psycopg.Connection[Any]:
    return cast("psycopg.Connection[Any]", conn.connection.driver_connection)


@contextlib.contextmanager
def _as_sqlalchemy_errors(conn: sa.Connection, statement: str) -> Iterator[None]:
    """psycopg errors raised as SQLAlchemy's, as if SQLAlchemy had run the statement: a broken
    connection is invalidated (the pool replaces it) and says so (``connection_invalidated``)."""
    try:
        yield
    except psycopg.Error as exc:
        broken = conn.invalidated or bool(_driver(conn).broken)
        if not conn.invalidated and broken:
            conn.invalidate(exc)
        raise sa.exc.DBAPIError.instance(
            statement, None, exc, psycopg.Error, connection_invalidated=broken
        ) from exc


def fetch(conn: sa.Connection, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Run one query in ``conn``'s transaction and return its rows; if the transaction has not
    begun on the server yet, its BEGIN travels in the same round trip."""
    with _as_sqlalchemy_errors(conn, sql):
        driver = _driver(conn)
        begin = driver.pgconn.transaction_status == _IDLE
        return _pipeline(driver, [(sql, params)], begin=begin, commit=False)


def read(conn: sa.Connection, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Run one query on its own, outside any transaction (a connection of these engines is in
    autocommit), and return its rows: one round trip, none of SQLAlchemy's work per query."""
    with _as_sqlalchemy_errors(conn, sql):
        return _pipeline(_driver(conn), [(sql, params)], begin=False, commit=False)


def defer(conn: sa.Connection, statement: Statement) -> None:
    """Send ``statement`` with the next :func:`flush` or :func:`commit` of ``conn``."""
    _listen(conn.engine)
    conn.info.setdefault(_DEFERRED, []).append(statement)


def flush(conn: sa.Connection) -> None:
    """Send the deferred writes now, in one round trip (a failure raises here)."""
    deferred = conn.info.pop(_DEFERRED, None)
    if deferred:
        _send(conn, deferred, commit=False)


def commit(conn: sa.Connection) -> None:
    """Commit ``conn``'s transaction, the deferred writes and the COMMIT in one round trip."""
    deferred = conn.info.pop(_DEFERRED, None) or []
    _send(conn, deferred, commit=True)
    conn.commit()  # SQLAlchemy's bookkeeping; the server's transaction is already over


def _send(conn: sa.Connection, statements: Sequence[Statement], *, commit: bool) -> None:
    """One round trip: ``statements`` (and the COMMIT), after the BEGIN if it is still due."""
    described = "; ".join([sql for sql, _ in statements] + (["COMMIT"] if commit else []))
    with _as_sqlalchemy_errors(conn, described):
        driver = _driver(conn)
        begin = driver.pgconn.transaction_status == _IDLE
        if begin and not statements:
            return  # nothing happened on the server: nothing to commit
        _pipeline(driver, statements, begin=begin, commit=commit)


def _pipeline(
    driver: psycopg.Connection[Any],
    statements: Sequence[Statement],
    *,
    begin: bool,
    commit: bool,
) -> list[tuple[Any, ...]]:
    """Send BEGIN (if ``begin``), ``statements`` and COMMIT (if ``commit``) in one pipeline, one
    round trip; the rows of the last statement. The first error the server reports is raised
    (the later statements did not run), after the pipeline ended."""
    with driver.cursor() as cursor:
        with driver.pipeline():
            if begin:
                cursor.execute("BEGIN", prepare=False)
            for sql, params in statements:
                cursor.execute(sql, params, prepare=True)
            if commit:
                cursor.execute("COMMIT", prepare=False)
        if commit or not statements or cursor.description is None:
            return []
        return cursor.fetchall()  # the last statement's: a cursor keeps its latest result


def _listen(engine: sa.Engine) -> None:
    if engine in _engines_listened:
        return
    sa.event.listen(engine, "commit", flush)
    sa.event.listen(engine, "rollback", discard)
    _engines_listened.add(engine)


def discard(conn: sa.Connection) -> None:
    """Forget ``conn``'s deferred writes (its transaction was rolled back, or is new)."""
    if conn.invalidated:
        # the pool clears an invalidated connection's info; reading it here would raise
        # PendingRollbackError over the outage that invalidated it
        return
    conn.info.pop(_DEFERRED, None)
