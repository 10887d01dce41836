"""Transactional resources of a participant (docs/architecture.md §4).

This module holds the Resource protocol, the Branch / Finish aliases, the helpers both resources
share and PostgresResource; their errors, :class:`~runtime.errors.ResourceError` and
:class:`~runtime.errors.ResourceUnavailable`, are in :mod:`runtime.errors`. ReservationResource,
with its ``twophase_reservation`` table, lives in :mod:`participant.reservation`, which builds on
this module.

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
* ReservationResource (participant/reservation.py) gives the hooks the args stored at prepare
  (JSON); prepare of an aborted tx refuses. On SQLite each transaction starts with BEGIN
  IMMEDIATE, so a handler's check-then-hold is serializable; elsewhere the handler locks what it
  checks (SELECT ... FOR UPDATE).
* Handlers must not commit or roll back the handle they are given.
* While the resource's database is down (a connection that fails or breaks, not a statement the
  server refused), neither resource votes NO: prepare raises :class:`ResourceUnavailable`, the
  worker waits for the database and redoes the batch from its log, and the redelivered PREPARE
  runs the handler again. A statement the server refused (a lock timeout, a constraint) is still
  a NO vote.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import psycopg
import tenacity
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.pq import TransactionStatus

from participant.operations import OperationSpec, Refuse
from runtime import outages, store
from runtime.errors import ResourceError, ResourceUnavailable
from runtime.redaction import redact_url

#: PostgreSQL's GIDSIZE is 200 bytes including the terminating NUL.
GID_MAX_BYTES = 199
_TX_ID_ROOM = 64  # bytes of the gid a participant name leaves to tx ids
_T = TypeVar("_T")
_Conn = psycopg.Connection[tuple[Any, ...]]


#: (tx_id, operation, args) of one branch to prepare
Branch = tuple[str, OperationSpec, dict[str, Any]]
#: (tx_id, operation or None, args, commit?) of one branch to finish
Finish = tuple[str, OperationSpec | None, dict[str, Any], bool]


#: admin_shutdown, crash_shutdown, cannot_connect_now: the server going away or not back yet
_SERVER_GONE = frozenset({"57P01", "57P02", "57P03"})


def connection_lost(exc: BaseException, conn: Any = None) -> bool:
    """Whether ``exc`` means the database went away (the connection failed or broke), rather
    than that the server refused a statement: a lock timeout or a constraint is an answer, and
    the branch votes NO; a lost connection is no answer at all."""
    if conn is not None and getattr(conn, "broken", False):
        return True
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if getattr(link, "connection_invalidated", False):  # SQLAlchemy saw a disconnect
            return True
        if isinstance(link, psycopg.Error):
            state = link.sqlstate
            if state is None:  # raised by libpq, not sent by the server
                return isinstance(link, psycopg.OperationalError | psycopg.InterfaceError)
            return state.startswith("08") or state in _SERVER_GONE
        if isinstance(link, ConnectionError | TimeoutError):
            return True
        link = link.__cause__ or link.__context__
    return False


def unavailable(url: str, exc: BaseException) -> ResourceUnavailable:
    """The outage to raise for ``exc`` (chain it: ``raise unavailable(...) from exc``)."""
    return ResourceUnavailable(
        f"the database at {redact_url(url)} did not answer: {outages.one_line(exc)}"
    )


@runtime_checkable
class Resource(Protocol):
    """What the participant worker drives; see the module docstring and docs/architecture.md §4."""

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


@runtime_checkable
class SharesTransactions(Protocol):
    """A resource whose batch can be one local transaction with the prepare log's records,
    when both live in one database (ReservationResource). The unit is a SQLAlchemy
    Connection in an open transaction; the worker commits it once per batch."""

    def shares_database(self, url: str) -> bool: ...
    def begin_unit(self) -> Any: ...
    def prepare_many_in(self, unit: Any, branches: Sequence[Branch]) -> list[Refuse | None]: ...
    def finish_many_in(self, unit: Any, branches: Sequence[Finish]) -> None: ...
    def committed_in(self, unit: Any, tx_ids: Iterable[str]) -> set[str]: ...


@runtime_checkable
class CommitsAtOnce(Protocol):
    """A resource that commits a one-phase branch without preparing it first (PostgresResource:
    a plain COMMIT instead of PREPARE TRANSACTION and COMMIT PREPARED). Its ``committed()``
    must tell afterwards whether such a commit happened."""

    def commit_at_once_many(self, branches: Sequence[Branch]) -> list[Refuse | None]: ...


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


def _one_by_one(
    run: Callable[[str, OperationSpec, dict[str, Any]], None], branches: Sequence[Branch]
) -> list[Refuse | None]:
    """``run`` each branch; its refusal or None."""
    results: list[Refuse | None] = []
    for tx_id, op, args in branches:
        try:
            run(tx_id, op, args)
        except Refuse as refusal:
            results.append(refusal)
        else:
            results.append(None)
    return results


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
        self._url = store.psycopg_url(url)
        self.url = url
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
            # Concurrent CREATE TABLE IF NOT EXISTS can still collide in pg_type (seen as
            # DuplicateObject), so participants starting together take turns.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('twophase_commit_marker'))")
            conn.execute(_MARKER_DDL)
            conn.commit()

        problem: str | None = None
        try:
            self._with_conn(setup)
        except psycopg.Error as exc:
            problem = store.configuration_problem(exc)
            if problem is None:
                raise
        if problem is not None:  # raised outside the except clause: not an outage by context
            raise ResourceError(f"PostgreSQL at {redact_url(self._url)}: {problem}")
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
            raise self._failed(exc) from exc
        try:
            conn.tpc_begin(gid)
            self._run_handler(conn, tx_id, op, args)
        except Exception as exc:
            if connection_lost(exc, conn):
                _discard(conn)
                raise unavailable(self._url, exc) from exc
            self._rollback_branch(conn)
            if isinstance(exc, Refuse):
                raise
            raise _refusal(exc) from exc
        try:
            conn.tpc_prepare()
        except Exception as exc:
            _discard(conn)
            if connection_lost(exc, conn):
                # Not answered: the branch may be prepared. The batch is redone once the
                # database answers, and a branch prepared without a PREPARED record (which
                # only follows this call) never voted YES: recovery rolls it back.
                raise unavailable(self._url, exc) from exc
            raise _refusal(exc) from exc
        self._parked[tx_id] = conn
        while len(self._parked) > self._pool_size:
            _discard(self._parked.popitem(last=False)[1])

    def commit_at_once(self, tx_id: str, op: OperationSpec, args: dict[str, Any]) -> None:
        """One phase: the handler and the commit marker in one plain transaction, committed.

        A crash before the COMMIT leaves nothing; after it, the marker says committed. A COMMIT
        that the server did not answer is ambiguous: it raises ResourceUnavailable, the worker
        waits for the database and redoes the batch from its log, and the redelivered PREPARE
        finds the marker (committed) or not (the handler runs again)."""
        gid = self._gid(tx_id)
        if gid is None:
            raise Refuse(f"tx_id {tx_id[:40]!r} is too long for a {GID_MAX_BYTES}-byte gid")
        try:
            known = (
                tx_id in self._parked or self._rows(_KNOWN, (gid, self._participant, tx_id))[0][0]
            )
            conn = None if known else self._acquire()
        except psycopg.Error as exc:
            raise self._failed(exc) from exc
        if conn is None:
            self._decide(tx_id, commit=True)  # prepared before, or committed already
            return
        try:
            self._run_handler(conn, tx_id, op, args)
        except Exception as exc:
            if connection_lost(exc, conn):
                _discard(conn)
                raise unavailable(self._url, exc) from exc
            self._rollback_plain(conn)
            if isinstance(exc, Refuse):
                raise
            raise _refusal(exc) from exc
        try:
            conn.commit()
        except Exception as exc:
            _discard(conn)
            if connection_lost(exc, conn):
                raise ResourceUnavailable(
                    f"the COMMIT of {tx_id!r} got no answer from PostgreSQL at"
                    f" {redact_url(self._url)} ({outages.one_line(exc)}); whether it committed"
                    " is read from twophase_commit_marker once the database answers"
                ) from exc
            raise _refusal(exc) from exc
        self._release(conn)

    def commit_at_once_many(self, branches: Sequence[Branch]) -> list[Refuse | None]:
        return _one_by_one(self.commit_at_once, branches)

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
        return _one_by_one(self.prepare, branches)

    def finish_many(self, branches: Sequence[Finish]) -> None:
        for tx_id, _op, _args, commit in branches:
            self._decide(tx_id, commit=commit)

    def probe(self) -> None:
        """Return when the database answers; raise when it does not (outage checks)."""
        self._with_conn(lambda conn: conn.execute("SELECT 1"))

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

    def _failed(self, exc: psycopg.Error) -> Exception:
        """What a failure before the handler ran is: an outage, or else a NO vote."""
        return unavailable(self._url, exc) if connection_lost(exc) else _refusal(exc)

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

    def _run_handler(
        self, conn: _Conn, tx_id: str, op: OperationSpec, args: dict[str, Any]
    ) -> None:
        """The handler, then the commit marker, in ``conn``'s open transaction."""
        timeout = sql.Literal(self._lock_timeout_ms)
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(timeout))
        op.prepare(conn, args)
        conn.execute(
            "INSERT INTO twophase_commit_marker (participant, tx_id) VALUES (%s, %s)",
            (self._participant, tx_id),
        )

    def _rollback_plain(self, conn: _Conn) -> None:
        try:
            conn.rollback()
        except Exception:
            _discard(conn)
        else:
            self._release(conn)

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
        # a host that drops packets would otherwise hold a connect for the kernel's TCP timeout
        if "connect_timeout" in self._url:
            return psycopg.connect(self._url)
        return psycopg.connect(self._url, connect_timeout=10)

    def _release(self, conn: _Conn) -> None:
        ok = not (self._closed or conn.closed or conn.broken) and len(self._idle) < self._pool_size
        if ok and conn.info.transaction_status == TransactionStatus.IDLE:
            self._idle.append(conn)
        else:
            _discard(conn)

    def _with_conn(self, fn: Callable[[_Conn], _T]) -> _T:
        """Run fn on a pooled connection; once more, on a new one, after an outage (the pooled
        one had gone stale, say after a server restart). A longer outage is the worker's to
        wait out."""
        retrying = outages.retrying(
            stop=tenacity.stop_after_attempt(2), what=f"a query to {redact_url(self._url)}"
        )
        result: _T = retrying(self._on_conn, fn)
        return result

    def _on_conn(self, fn: Callable[[_Conn], _T]) -> _T:
        conn = self._acquire()
        try:
            result = fn(conn)
        except BaseException as exc:
            _discard(conn)
            if isinstance(exc, Exception) and outages.is_outage(exc):
                self._drop_idle()  # after a server restart every pooled connection is stale
            raise
        self._release(conn)
        return result

    def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            _discard(conn)
