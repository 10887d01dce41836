"""Transactional resources of a participant (ARCHITECTURE.md §4).

Driven serially from one thread by the participant worker; every method is idempotent and works
from a new instance after a restart. Choices:

* PostgresResource uses the plain gid ``twophase:<participant>:<tx_id>`` (``tpc_begin`` with a
  string), not an XA triple: psycopg caps XA parts at 64 characters and base64-encodes them, so
  gids could neither be read in ``pg_prepared_xacts`` nor filtered by prefix. A gid holds at most
  199 bytes; a longer tx_id is refused. Participant names contain no ``:`` and are unique per
  cluster. The branch runs under ``SET LOCAL lock_timeout``: the worker is serial, so a prepare
  waiting for a row locked by one of its own prepared branches would wait forever; it votes NO.
  The connection that prepared a branch commits it; at most ``pool_size`` are kept attached,
  older ones are closed (the branch survives) and finished later by gid.
* Commit of a branch neither prepared nor committed, and abort of a committed one, raise
  ResourceError (heuristic hazard, never accepted silently). Prepare of a committed tx: no-op.
* ReservationResource gives the hooks the args stored at prepare (JSON); prepare of an aborted
  tx refuses. On SQLite each transaction starts with BEGIN IMMEDIATE, so a handler's check-then-
  hold is serializable; elsewhere the handler locks what it checks (SELECT ... FOR UPDATE).
* Handlers must not commit or roll back the handle they are given.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import psycopg
import sqlalchemy as sa
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.pq import TransactionStatus

from participant.operations import OperationSpec, Refuse

#: PostgreSQL's GIDSIZE is 200 bytes including the terminating NUL.
GID_MAX_BYTES = 199
_TX_ID_ROOM = 64  # bytes of the gid a participant name leaves to tx ids
_T = TypeVar("_T")
_Conn = psycopg.Connection[tuple[Any, ...]]


#: (tx_id, operation, args) of one branch to prepare
Branch = tuple[str, OperationSpec, dict[str, Any]]
#: (tx_id, operation or None, args, commit?) of one branch to finish
Finish = tuple[str, OperationSpec | None, dict[str, Any], bool]


class _NeedsIsolation(Exception):
    """An optimistic batch met a refusal or failure: redo it with a savepoint per branch."""


class ResourceError(Exception):
    """The resource is misconfigured or hit a heuristic outcome; the message says what to fix."""


@runtime_checkable
class Resource(Protocol):
    """What the participant worker drives; see the module docstring and ARCHITECTURE.md §4."""

    def bind(self, participant: str) -> None: ...
    def prepare(self, tx_id: str, op: OperationSpec, args: dict[str, Any]) -> None: ...
    def commit(self, tx_id: str, op: OperationSpec, args: dict[str, Any]) -> None: ...
    def abort(self, tx_id: str, op: OperationSpec | None, args: dict[str, Any]) -> None: ...
    def prepared(self) -> set[str]: ...
    def committed(self, tx_ids: Iterable[str]) -> set[str]: ...
    def stored_operation(self, tx_id: str) -> str | None: ...
    def prepare_many(self, branches: Sequence[Branch]) -> list[Refuse | None]: ...
    def finish_many(self, branches: Sequence[Finish]) -> None: ...
    def close(self) -> None: ...


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (fit for messages and logs)."""
    url = re.sub(r"(password\s*=\s*)\S+", r"\1***", url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def check_max_prepared_transactions(url: str, setting: str | int) -> None:
    """Raise ResourceError when ``SHOW max_prepared_transactions`` gave 0 for the server at url."""
    if int(setting) <= 0:
        raise ResourceError(
            f"PostgreSQL at {redact_url(url)} has max_prepared_transactions = 0; native two-phase"
            " commit needs it > 0: ALTER SYSTEM SET max_prepared_transactions = 200 and restart"
            " the server"
        )


def _refusal(exc: Exception) -> Refuse:
    return Refuse(f"{type(exc).__name__}: {exc}")


def _caused(refusal: Refuse, cause: Exception) -> Refuse:
    refusal.__cause__ = cause
    return refusal


def _discard(conn: _Conn) -> None:
    with contextlib.suppress(Exception):
        conn.close()


def _read(conn: _Conn, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    rows = conn.execute(query, params).fetchall()
    conn.rollback()
    return rows


_MARKER_DDL = """CREATE TABLE IF NOT EXISTS twophase_commit_marker (
    participant text NOT NULL,
    tx_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (participant, tx_id))"""


_KNOWN = """SELECT EXISTS (SELECT 1 FROM pg_prepared_xacts
                           WHERE gid = %s AND database = current_database())
    OR EXISTS (SELECT 1 FROM twophase_commit_marker WHERE participant = %s AND tx_id = %s)"""


class PostgresResource:
    """The handler runs in a native PostgreSQL branch: PREPARE TRANSACTION / COMMIT PREPARED."""

    def __init__(self, url: str, *, pool_size: int = 4, lock_timeout: float = 0.5) -> None:
        if pool_size < 1:
            raise ResourceError(f"pool_size must be at least 1, not {pool_size}")
        self._url = re.sub(r"^(postgres(?:ql)?)\+psycopg:", r"\1:", url)
        self._pool_size = pool_size
        self._lock_timeout_ms = max(0, round(lock_timeout * 1000))
        self._idle: list[_Conn] = []
        self._parked: OrderedDict[str, _Conn] = OrderedDict()  # tx_id -> conn in TPC state
        self._participant: str | None = None
        self._prefix = ""
        self._closed = False

    def bind(self, participant: str) -> None:
        prefix = f"twophase:{participant}:"
        if not participant or ":" in participant:
            raise ResourceError(f"participant name {participant!r} must be non-empty without ':'")
        if len(prefix.encode()) > GID_MAX_BYTES - _TX_ID_ROOM:
            raise ResourceError(f"participant name {participant!r} is too long: use <= 125 bytes")
        if self._participant not in (None, participant):
            raise ResourceError(f"resource already bound to participant {self._participant!r}")

        def setup(conn: _Conn) -> None:
            rows = _read(conn, "SHOW max_prepared_transactions", ())
            check_max_prepared_transactions(self._url, rows[0][0])
            try:
                conn.execute(_MARKER_DDL)
                conn.commit()
            except (pg_errors.UniqueViolation, pg_errors.DuplicateTable):
                conn.rollback()  # created concurrently by another participant

        self._with_conn(setup)
        self._participant, self._prefix = participant, prefix

    def prepare(self, tx_id: str, op: OperationSpec, args: dict[str, Any]) -> None:
        gid = self._gid(tx_id)
        if gid is None:
            raise Refuse(f"tx_id {tx_id[:40]!r} is too long for a {GID_MAX_BYTES}-byte gid")
        if tx_id in self._parked:
            return
        try:
            if self._rows(_KNOWN, (gid, self._participant, tx_id))[0][0]:
                return  # already prepared, or already committed
            conn = self._acquire()
        except psycopg.Error as exc:
            raise _refusal(exc) from exc
        try:
            conn.tpc_begin(gid)
            timeout = sql.Literal(self._lock_timeout_ms)
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(timeout))
            op.prepare(conn, args)
            conn.execute(
                "INSERT INTO twophase_commit_marker (participant, tx_id) VALUES (%s, %s)",
                (self._participant, tx_id),
            )
        except Refuse:
            self._rollback_branch(conn)
            raise
        except Exception as exc:
            self._rollback_branch(conn)
            raise _refusal(exc) from exc
        try:
            conn.tpc_prepare()
        except Exception as exc:
            _discard(conn)
            if getattr(exc, "sqlstate", None) is None:
                # Not answered by the server (e.g. connection lost): the branch may be prepared.
                with contextlib.suppress(psycopg.Error):
                    self._with_conn(lambda c: c.tpc_rollback(gid))
            raise _refusal(exc) from exc
        self._parked[tx_id] = conn
        while len(self._parked) > self._pool_size:
            _discard(self._parked.popitem(last=False)[1])

    def commit(self, tx_id: str, op: OperationSpec, args: dict[str, Any]) -> None:
        self._decide(tx_id, commit=True)

    def abort(self, tx_id: str, op: OperationSpec | None, args: dict[str, Any]) -> None:
        self._decide(tx_id, commit=False)

    def prepared(self) -> set[str]:
        prefix = self._bound_prefix()
        query = "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
        rows = self._rows(query + " AND starts_with(gid, %s)", (prefix,))
        return {gid[len(prefix) :] for (gid,) in rows}

    def committed(self, tx_ids: Iterable[str]) -> set[str]:
        self._bound_prefix()
        wanted = [t for t in tx_ids if "\x00" not in t]
        if not wanted:
            return set()
        query = (
            "SELECT tx_id FROM twophase_commit_marker WHERE participant = %s AND tx_id = ANY(%s)"
        )
        return {tx for (tx,) in self._rows(query, (self._participant, wanted))}

    def stored_operation(self, tx_id: str) -> str | None:
        """A native branch rolls back without the operation's help: it is never needed."""
        return None

    def prepare_many(self, branches: Sequence[Branch]) -> list[Refuse | None]:
        """Each native branch is its own PREPARE TRANSACTION: they go one by one."""
        results: list[Refuse | None] = []
        for tx_id, op, args in branches:
            try:
                self.prepare(tx_id, op, args)
            except Refuse as refusal:
                results.append(refusal)
            else:
                results.append(None)
        return results

    def finish_many(self, branches: Sequence[Finish]) -> None:
        for tx_id, _op, _args, commit in branches:
            self._decide(tx_id, commit=commit)

    def close(self) -> None:
        self._closed = True
        for conn in [*self._idle, *self._parked.values()]:
            _discard(conn)  # prepared branches survive their session
        self._idle.clear()
        self._parked.clear()

    def _bound_prefix(self) -> str:
        if self._participant is None:
            raise ResourceError("call bind(participant) before using the resource")
        return self._prefix

    def _gid(self, tx_id: str) -> str | None:
        gid = self._bound_prefix() + tx_id
        return None if len(gid.encode()) > GID_MAX_BYTES or "\x00" in tx_id else gid

    def _rows(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._with_conn(lambda c: _read(c, query, params))

    def _decide(self, tx_id: str, *, commit: bool) -> None:
        gid = self._gid(tx_id)
        if gid is not None and self._finish(tx_id, gid, commit=commit):
            return
        # Not prepared (any more): the commit marker tells what happened to the branch.
        is_committed = tx_id in self.committed([tx_id])
        if is_committed != commit:
            raise ResourceError(
                f"cannot {'commit' if commit else 'abort'} {tx_id!r} of participant"
                f" {self._participant!r}: the branch is {'' if is_committed else 'not '}committed"
                " and not prepared (heuristic hazard); resolve it manually"
            )

    def _finish(self, tx_id: str, gid: str, *, commit: bool) -> bool:
        """COMMIT/ROLLBACK PREPARED; False when no such prepared transaction exists."""
        conn = self._parked.pop(tx_id, None)
        if conn is not None:
            try:
                conn.tpc_commit() if commit else conn.tpc_rollback()
            except psycopg.Error:
                _discard(conn)  # e.g. its session died: retry by gid on another connection
            else:
                self._release(conn)
                return True

        def finish(c: _Conn) -> bool:
            try:
                c.tpc_commit(gid) if commit else c.tpc_rollback(gid)
            except pg_errors.UndefinedObject:
                return False
            return True

        return self._with_conn(finish)

    def _rollback_branch(self, conn: _Conn) -> None:
        try:
            conn.tpc_rollback()  # not prepared yet: a plain ROLLBACK
        except Exception:
            _discard(conn)
        else:
            self._release(conn)

    def _acquire(self) -> _Conn:
        if self._closed:
            raise ResourceError("the resource is closed")
        while self._idle:
            conn = self._idle.pop()
            if not (conn.closed or conn.broken):
                return conn
            _discard(conn)
        return psycopg.connect(self._url)

    def _release(self, conn: _Conn) -> None:
        ok = not (self._closed or conn.closed or conn.broken) and len(self._idle) < self._pool_size
        if ok and conn.info.transaction_status == TransactionStatus.IDLE:
            self._idle.append(conn)
        else:
            _discard(conn)

    def _with_conn(self, fn: Callable[[_Conn], _T]) -> _T:
        """Run fn on a pooled connection; once more on a new one if that one had gone stale."""
        conn = self._acquire()
        try:
            try:
                result = fn(conn)
            except psycopg.OperationalError:
                _discard(conn)
                conn = psycopg.connect(self._url)
                result = fn(conn)
        except BaseException:
            _discard(conn)
            raise
        self._release(conn)
        return result


_metadata = sa.MetaData()
_reservations = sa.Table(
    "twophase_reservation",
    _metadata,
    sa.Column("participant", sa.String(255), primary_key=True),
    sa.Column("tx_id", sa.String(255), primary_key=True),
    sa.Column("operation", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # prepared | committed | aborted
    sa.Column("args", sa.Text, nullable=False),  # JSON
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_twophase_reservation_state", "participant", "state"),
)


def _sqlalchemy_url(url: str) -> str:
    if "://" not in url:
        return f"sqlite:///{url}"  # a bare path is a SQLite file
    return re.sub(r"^postgres(?:ql)?://", "postgresql+psycopg://", url)  # psycopg 3


class ReservationResource:
    """Any SQLAlchemy database: prepare records and checks a hold, commit applies, abort releases.

    Exactly once: the hook and the state change of the ``twophase_reservation`` row happen in one
    local transaction, and the change is ``UPDATE ... WHERE state = 'prepared'``.
    """

    def __init__(self, url: str, *, busy_timeout: float = 10.0) -> None:
        self._engine = sa.create_engine(_sqlalchemy_url(url))
        self._participant: str | None = None
        if self._engine.dialect.name == "sqlite":
            timeout_ms = max(0, round(busy_timeout * 1000))

            @sa.event.listens_for(self._engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see below)
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute(f"PRAGMA busy_timeout={timeout_ms}")
                cur.close()

            @sa.event.listens_for(self._engine, "begin")
            def _on_begin(conn: sa.Connection) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    def bind(self, participant: str) -> None:
        if not participant or len(participant) > 255:
            raise ResourceError(f"participant name {participant!r} must have 1 to 255 characters")
        if self._participant not in (None, participant):
            raise ResourceError(f"resource already bound to participant {self._participant!r}")
        try:
            _metadata.create_all(self._engine)
        except sa.exc.DBAPIError:
            _metadata.create_all(self._engine)  # lost a race with a concurrent creator
        self._participant = participant

    def prepare(self, tx_id: str, op: OperationSpec, args: dict[str, Any]) -> None:
        refusal = self.prepare_many([(tx_id, op, args)])[0]
        if refusal is not None:
            raise refusal

    def prepare_many(self, branches: Sequence[Branch]) -> list[Refuse | None]:
        """Prepare a batch in ONE local transaction: one durable commit for the whole batch.

        The batch first runs optimistically, every handler straight in the transaction (one
        round trip each, plus three for the batch). If any handler refuses or fails, that
        attempt is rolled back and the batch runs again with a savepoint around each handler,
        so a refusal undoes its own branch only. Handlers may therefore run twice; their first
        run leaves nothing behind. Returns, per branch, its refusal or None.
        """
        self._bound()  # a misconfiguration, not a NO vote
        if not branches:
            return []
        try:
            try:
                return self._prepare_batch(branches, isolate=False)
            except _NeedsIsolation:
                return self._prepare_batch(branches, isolate=True)
        except Refuse as refusal:  # the transaction as a whole failed (e.g. a handler ended it)
            return [refusal] * len(branches)
        except Exception as exc:
            return [_caused(_refusal(exc), exc)] * len(branches)

    def _prepare_batch(self, branches: Sequence[Branch], *, isolate: bool) -> list[Refuse | None]:
        t = _reservations
        results: list[Refuse | None] = []
        new_rows: list[dict[str, Any]] = []
        with self._engine.connect() as conn, conn.begin() as trans:
            states = self._states(conn, [tx_id for tx_id, _, _ in branches])
            for tx_id, op, args in branches:
                state = states.get(tx_id)
                if state == "aborted":
                    results.append(Refuse(f"transaction {tx_id} is already aborted"))
                    continue
                if state is not None:
                    results.append(None)  # already prepared (or committed)
                    continue
                try:
                    payload = json.dumps(args, sort_keys=True, allow_nan=False)
                except ValueError as exc:
                    results.append(_caused(_refusal(exc), exc))
                    continue
                savepoint = conn.begin_nested() if isolate else None
                try:
                    op.prepare(conn, args)
                    if not trans.is_active:
                        raise Refuse(f"handler of {op.name!r} ended the transaction; it must not")
                except Exception as exc:
                    if savepoint is None:
                        raise _NeedsIsolation from exc
                    if not trans.is_active:
                        raise
                    savepoint.rollback()
                    results.append(exc if isinstance(exc, Refuse) else _caused(_refusal(exc), exc))
                    continue
                if savepoint is not None:
                    savepoint.commit()
                states[tx_id] = "prepared"
                new_rows.append(
                    {
                        "participant": self._participant,
                        "tx_id": tx_id,
                        "operation": op.name,
                        "state": "prepared",
                        "args": payload,
                    }
                )
                results.append(None)
            if new_rows:
                conn.execute(sa.insert(t), new_rows)
        return results

    def _states(self, conn: sa.Connection, tx_ids: list[str]) -> dict[str, str]:
        t, found = _reservations, {}
        for start in range(0, len(tx_ids), 500):
            chunk = tx_ids[start : start + 500]
            query = sa.select(t.c.tx_id, t.c.state).where(
                t.c.participant == self._bound(), t.c.tx_id.in_(chunk)
            )
            found.update({row.tx_id: row.state for row in conn.execute(query)})
        return found

    def commit(self, tx_id: str, op: OperationSpec, args: dict[str, Any]) -> None:
        self._decide(tx_id, op, "committed")

    def abort(self, tx_id: str, op: OperationSpec | None, args: dict[str, Any]) -> None:
        self._decide(tx_id, op, "aborted")

    def prepared(self) -> set[str]:
        t = _reservations
        query = sa.select(t.c.tx_id).where(
            t.c.participant == self._bound(), t.c.state == "prepared"
        )
        with self._engine.connect() as conn:
            return set(conn.execute(query).scalars())

    def committed(self, tx_ids: Iterable[str]) -> set[str]:
        t, participant = _reservations, self._bound()
        query = sa.select(t.c.tx_id).where(
            t.c.participant == participant, t.c.tx_id.in_(list(tx_ids)), t.c.state == "committed"
        )
        with self._engine.connect() as conn:
            return set(conn.execute(query).scalars())

    def stored_operation(self, tx_id: str) -> str | None:
        """The operation a prepared reservation was made by (recovery of orphans needs it)."""
        with self._engine.connect() as conn:
            return conn.execute(
                sa.select(_reservations.c.operation).where(self._key(tx_id))
            ).scalar()

    def close(self) -> None:
        self._engine.dispose()

    def _bound(self) -> str:
        if self._participant is None:
            raise ResourceError("call bind(participant) before using the resource")
        return self._participant

    def _key(self, tx_id: str) -> sa.ColumnElement[bool]:
        t = _reservations
        return sa.and_(t.c.participant == self._bound(), t.c.tx_id == tx_id)

    def finish_many(self, branches: Sequence[Finish]) -> None:
        """Commit or abort a batch in ONE local transaction.

        Optimistically first: the state rows change with one UPDATE per outcome, then each
        hook runs. If anything fails, the attempt is rolled back and the batch runs again with
        a savepoint per branch: a hook that raises leaves its own branch prepared while the
        others go through, and the first such error is raised once the batch is durable.
        """
        if not branches:
            return
        try:
            with self._engine.begin() as conn:
                self._finish_optimistically(conn, branches)
        except Exception:
            self._finish_isolated(branches)  # reproduces every failure, branch by branch

    def _finish_isolated(self, branches: Sequence[Finish]) -> None:
        failures: list[Exception] = []
        with self._engine.begin() as conn:
            for tx_id, op, _args, commit in branches:
                savepoint = conn.begin_nested()
                try:
                    self._decide_in(conn, tx_id, op, "committed" if commit else "aborted")
                except Exception as exc:
                    savepoint.rollback()
                    failures.append(exc)
                else:
                    savepoint.commit()
        if failures:
            raise failures[0]

    def _finish_optimistically(self, conn: sa.Connection, branches: Sequence[Finish]) -> None:
        t, participant = _reservations, self._bound()
        rows = {
            row.tx_id: row
            for row in conn.execute(
                sa.select(t.c.tx_id, t.c.state, t.c.operation, t.c.args).where(
                    t.c.participant == participant, t.c.tx_id.in_([b[0] for b in branches])
                )
            )
        }
        for outcome in ("committed", "aborted"):
            wanted = [b for b in branches if (b[3] is True) == (outcome == "committed")]
            to_change = [b[0] for b in wanted if rows.get(b[0]) and rows[b[0]].state == "prepared"]
            if to_change:
                changed = conn.execute(
                    sa.update(t)
                    .where(
                        t.c.participant == participant,
                        t.c.tx_id.in_(to_change),
                        t.c.state == "prepared",
                    )
                    .values(state=outcome, decided_at=sa.func.now())
                ).rowcount
                if changed != len(set(to_change)):
                    raise ResourceError("a reservation changed under the batch")
            for tx_id, op, _args, _commit in wanted:
                row = rows.get(tx_id)
                if row is None or row.state != "prepared":
                    state = None if row is None else row.state
                    if state == outcome or (state is None and outcome == "aborted"):
                        continue  # done before, or an abort of a branch never prepared here
                    raise ResourceError(f"cannot finish {tx_id!r}: it is {state}")
                if op is None or op.name != row.operation:
                    raise ResourceError(f"{tx_id!r} needs operation {row.operation!r}")
                hook = op.on_commit if outcome == "committed" else op.on_abort
                if hook is not None:
                    hook(conn, json.loads(row.args))

    def _decide(self, tx_id: str, op: OperationSpec | None, outcome: str) -> None:
        with self._engine.begin() as conn:
            self._decide_in(conn, tx_id, op, outcome)

    def _decide_in(
        self, conn: sa.Connection, tx_id: str, op: OperationSpec | None, outcome: str
    ) -> None:
        key, t = self._key(tx_id), _reservations
        verb = "commit" if outcome == "committed" else "abort"
        updated = conn.execute(
            sa.update(t)
            .where(key, t.c.state == "prepared")
            .values(state=outcome, decided_at=sa.func.now())
        ).rowcount
        row = conn.execute(sa.select(t.c.state, t.c.operation, t.c.args).where(key)).first()
        if updated != 1 or row is None:
            state = None if row is None else row.state
            if state == outcome or (state is None and outcome == "aborted"):
                return  # done before, or an abort of a transaction never prepared here
            raise ResourceError(
                f"cannot {verb} {tx_id!r} of participant {self._participant!r}: it is"
                f" {state or 'not prepared here'} (heuristic hazard); resolve it manually"
            )
        if op is None or op.name != row.operation:
            raise ResourceError(
                f"cannot {verb} {tx_id!r}: it needs operation {row.operation!r}, got"
                f" {None if op is None else op.name!r}; register that operation"
            )
        hook = op.on_commit if outcome == "committed" else op.on_abort
        if hook is not None:
            hook(conn, json.loads(row.args))
