"""ReservationResource: a participant's branches as reservation rows in any SQLAlchemy database.

The Resource protocol, the Branch / Finish aliases, the shared helpers and PostgresResource live
in :mod:`participant.resources`; its module docstring lists the choices both resources make, and
:mod:`runtime.errors` holds their errors. This module holds ReservationResource, its
``twophase_reservation`` table and its helpers. The shared helpers are called through the module
(``resources._refusal``), looked up at each call as before the split.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa

from participant import resources
from participant.operations import OperationSpec, Refuse
from participant.resources import Branch, Finish
from runtime import pgbatch
from runtime.errors import ConfigurationError, ResourceError
from runtime.redaction import redact_url
from runtime.store import (
    AnalyzeSchedule,
    analyze_in_background,
    database_url,
    in_ids,
    pg_connect_args,
    sqlite_setup,
)


class _NeedsIsolation(Exception):
    """An optimistic batch met a refusal or failure: redo it with a savepoint per branch."""


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


def _create_engine(url: str) -> sa.Engine:
    """An engine for ``url`` (does not connect); ResourceError, one line, if it cannot be."""
    problem = ""
    try:
        parsed = sa.make_url(database_url(url, any_dialect=True))
        if parsed.get_backend_name() == "postgresql":
            return pgbatch.create_engine(parsed, connect_args=pg_connect_args(parsed))
        return sa.create_engine(parsed)
    except (ConfigurationError, sa.exc.ArgumentError, ValueError, ImportError) as exc:
        problem = redact_url(" ".join(str(exc).split())) or type(exc).__name__
    # raised outside the except clause: the message says all, a traceback would not add to it
    raise ResourceError(f"cannot use database URL {redact_url(url)!r}: {problem}")


def _run_one(
    conn: sa.Connection,
    trans: sa.Transaction,
    op: OperationSpec,
    args: dict[str, Any],
    *,
    isolate: bool,
) -> Refuse | None:
    """One branch's handler: its refusal, or None. On the first attempt a failure asks for the
    isolated attempt (the handler may have written before it refused)."""
    savepoint = conn.begin_nested() if isolate else None
    try:
        op.prepare(conn, args)
        if not trans.is_active:
            raise Refuse(f"handler of {op.name!r} ended the transaction; it must not")
    except Exception as exc:
        if savepoint is None:
            raise _NeedsIsolation from exc
        if not trans.is_active or resources.connection_lost(exc):
            raise
        savepoint.rollback()
        return exc if isinstance(exc, Refuse) else resources._caused(resources._refusal(exc), exc)
    if savepoint is not None:
        savepoint.commit()
    return None


def _run_many(
    conn: sa.Connection,
    trans: sa.Transaction,
    op: OperationSpec,
    branches: Sequence[Branch],
    indexes: list[int],
) -> list[Refuse | None]:
    """A batch handler over ``indexes``: it refuses branches one by one and leaves nothing of a
    refused one. If it raises, the batch goes to the isolated attempt."""
    assert op.prepare_many is not None
    try:
        refusals = op.prepare_many(conn, [branches[i][2] for i in indexes])
        if len(refusals) != len(indexes):
            raise ResourceError(
                f"batch handler of {op.name!r} answered {len(refusals)} of {len(indexes)} branches"
            )
        if not trans.is_active:
            raise Refuse(f"handler of {op.name!r} ended the transaction; it must not")
    except Exception as exc:
        raise _NeedsIsolation from exc
    return list(refusals)


#: Connection.info key: the unit holds work that a failed attempt must not roll back
_UNIT_HAS_WORK = "twophase.unit_has_work"


@contextlib.contextmanager
def _attempt_in(unit: sa.Connection) -> Iterator[sa.Transaction]:
    """An attempt in ``unit`` that can be undone alone: in a savepoint when the unit already
    holds other work, else (the common case, two round trips fewer) in the unit's own
    transaction, which a failure rolls back and begins again."""
    if unit.info.get(_UNIT_HAS_WORK):
        with unit.begin_nested() as savepoint:
            yield savepoint
        return
    trans = unit.get_transaction()
    assert trans is not None, "a unit is a connection in an open transaction"
    try:
        yield trans
    except BaseException:
        unit.rollback()
        unit.begin()
        raise
    unit.info[_UNIT_HAS_WORK] = True


#: On PostgreSQL the hot statements go through psycopg directly (see :mod:`runtime.pgbatch`):
#: the first of a transaction carries its BEGIN, and the reservations are written with the
#: batch's COMMIT.
_PG_STATES = (
    "SELECT tx_id, state FROM twophase_reservation WHERE participant = %s AND tx_id = ANY(%s)"
)
_PG_DECIDE = (
    "UPDATE twophase_reservation SET state = %s, decided_at = now()"
    " WHERE participant = %s AND tx_id = ANY(%s) AND state = 'prepared'"
    " RETURNING tx_id, operation, args"
)


class _Statements:
    """The resource's own statements on other databases, built once per dialect (SQLAlchemy
    then caches their compiled form, and a statement's text does not change with the batch
    size)."""

    def __init__(self, dialect: str) -> None:
        t = _reservations
        # bind names differ from column names: an UPDATE reserves those for its SET clause
        ids = in_ids(t.c.tx_id, dialect, "tx_ids")
        mine = t.c.participant == sa.bindparam("of_participant")
        self.states = sa.select(t.c.tx_id, t.c.state).where(mine, ids)
        self.decide = (
            sa.update(t)
            .where(mine, ids, t.c.state == "prepared")
            .values(state=sa.bindparam("new_state"), decided_at=sa.func.now())
            .returning(t.c.tx_id, t.c.operation, t.c.args)
        )


class _Decided(NamedTuple):
    tx_id: str
    operation: str
    args: str


def _settle_deferred(unit: sa.Connection) -> None:
    """Send the unit's deferred writes before an attempt that may be undone alone: written
    inside its savepoint, a rollback of the attempt would take them along."""
    if pgbatch.is_postgres(unit):
        pgbatch.flush(unit)


@functools.cache
def _statements(dialect: str) -> _Statements:
    return _Statements(dialect)


def _insert_reservations(conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` in ``conn``'s transaction (on PostgreSQL with its commit)."""
    if not pgbatch.is_postgres(conn):
        conn.execute(sa.insert(_reservations), rows)
        return
    columns = {"participant": "text", "tx_id": "text", "operation": "text"}
    columns |= {"state": "text", "args": "text"}
    values = [tuple(row[c] for c in columns) for row in rows]
    pgbatch.defer(conn, pgbatch.insert_rows("twophase_reservation", columns, values))


class ReservationResource:
    """Any SQLAlchemy database: prepare records and checks a hold, commit applies, abort releases.

    Exactly once: the hook and the state change of the ``twophase_reservation`` row happen in one
    local transaction, and the change is ``UPDATE ... WHERE state = 'prepared'``.
    """

    def __init__(self, url: str, *, busy_timeout: float = 10.0) -> None:
        self.url = url
        self._engine = _create_engine(url)
        self._participant: str | None = None
        self._analyze = AnalyzeSchedule()
        if self._engine.dialect.name == "sqlite":
            # foreign_keys as the application's own connections have it (off unless it sets it)
            sqlite_setup(
                self._engine,
                busy_timeout_ms=max(0, round(busy_timeout * 1000)),
                foreign_keys=False,
                begin_immediate=True,
            )

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
        return self._prepare(None, branches)

    def prepare_many_in(
        self, unit: sa.Connection, branches: Sequence[Branch]
    ) -> list[Refuse | None]:
        """:meth:`prepare_many` in ``unit``'s open transaction (see :meth:`begin_unit`); an
        attempt that fails is undone alone (see :func:`_attempt_in`), the unit's other work
        stays."""
        return self._prepare(unit, branches)

    def _prepare(
        self, unit: sa.Connection | None, branches: Sequence[Branch]
    ) -> list[Refuse | None]:
        self._bound()  # a misconfiguration, not a NO vote
        if not branches:
            return []
        try:
            if unit is not None:
                _settle_deferred(unit)
            try:
                return self._attempt(unit, branches, isolate=False)
            except _NeedsIsolation as failed:
                if resources.connection_lost(failed):
                    raise  # the database went away: no attempt would do better now
                return self._attempt(unit, branches, isolate=True)
        except Refuse as refusal:  # the transaction as a whole failed (e.g. a handler ended it)
            return [refusal] * len(branches)
        except Exception as exc:
            if resources.connection_lost(exc):  # no answer is not a NO: the batch is redone
                raise resources.unavailable(self.url, exc) from exc
            return [resources._caused(resources._refusal(exc), exc)] * len(branches)

    def _attempt(
        self, unit: sa.Connection | None, branches: Sequence[Branch], *, isolate: bool
    ) -> list[Refuse | None]:
        if unit is None:
            with self._engine.connect() as conn, conn.begin() as trans:
                results, written = self._prepare_batch(conn, trans, branches, isolate=isolate)
        else:
            with _attempt_in(unit) as trans:
                results, written = self._prepare_batch(unit, trans, branches, isolate=isolate)
        if self._analyze.wrote(written):
            analyze_in_background(self._engine, _reservations)
        return results

    def _prepare_batch(
        self,
        conn: sa.Connection,
        trans: sa.Transaction,
        branches: Sequence[Branch],
        *,
        isolate: bool,
    ) -> tuple[list[Refuse | None], int]:
        """Run the handlers: batch handlers once per operation (after the single ones) on the
        first attempt, every branch alone in its savepoint on the isolated one."""
        results: list[Refuse | None] = [None] * len(branches)
        rows: dict[int, dict[str, Any]] = {}
        batched: dict[str, tuple[OperationSpec, list[int]]] = {}
        first_of: dict[str, int] = {}
        repeats: list[tuple[int, int]] = []
        states = self._states(conn, [tx_id for tx_id, _, _ in branches])
        for i, (tx_id, op, args) in enumerate(branches):
            if tx_id in first_of:
                repeats.append((i, first_of[tx_id]))
                continue
            first_of[tx_id] = i
            state = states.get(tx_id)
            if state == "aborted":
                results[i] = Refuse(f"transaction {tx_id} is already aborted")
                continue
            if state is not None:
                continue  # already prepared (or committed)
            try:
                payload = json.dumps(args, sort_keys=True, allow_nan=False)
            except ValueError as exc:
                results[i] = resources._caused(resources._refusal(exc), exc)
                continue
            rows[i] = {
                "participant": self._participant,
                "tx_id": tx_id,
                "operation": op.name,
                "state": "prepared",
                "args": payload,
            }
            if op.prepare_many is not None and not isolate:
                batched.setdefault(op.name, (op, []))[1].append(i)
                continue
            refusal = _run_one(conn, trans, op, args, isolate=isolate)
            if refusal is not None:
                results[i] = refusal
                del rows[i]
        for op, indexes in batched.values():
            for i, refusal in zip(
                indexes, _run_many(conn, trans, op, branches, indexes), strict=True
            ):
                if refusal is not None:
                    results[i] = refusal
                    del rows[i]
        for repeat, first in repeats:
            results[repeat] = results[first]
        if rows:
            _insert_reservations(conn, [rows[i] for i in sorted(rows)])
        return results, len(rows)

    def _states(self, conn: sa.Connection, tx_ids: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        postgres, query = pgbatch.is_postgres(conn), _statements(conn.dialect.name).states
        for start in range(0, len(tx_ids), 500):
            chunk = tx_ids[start : start + 500]
            if postgres:
                found.update(pgbatch.fetch(conn, _PG_STATES, (self._bound(), chunk)))
                continue
            params = {"of_participant": self._bound(), "tx_ids": chunk}
            found.update({row.tx_id: row.state for row in conn.execute(query, params)})
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

    def committed_in(self, unit: sa.Connection, tx_ids: Iterable[str]) -> set[str]:
        """:meth:`committed`, read in ``unit``'s open transaction (on SQLite another connection
        would wait for the unit's write lock, which this thread holds)."""
        states = self._states(unit, list(tx_ids))
        return {tx for tx, state in states.items() if state == "committed"}

    def stored_operation(self, tx_id: str) -> str | None:
        """The operation a prepared reservation was made by (recovery of orphans needs it)."""
        with self._engine.connect() as conn:
            return conn.execute(
                sa.select(_reservations.c.operation).where(self._key(tx_id))
            ).scalar()

    def probe(self) -> None:
        """Return when the database answers; raise when it does not (outage checks)."""
        with self._engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

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
            with self._engine.begin() as conn:  # reproduces every failure, branch by branch
                failures = self._finish_each(conn, branches)
            if failures:
                raise failures[0] from None

    def finish_many_in(self, unit: sa.Connection, branches: Sequence[Finish]) -> None:
        """:meth:`finish_many` in ``unit``'s open transaction (see :meth:`begin_unit`).

        When a hook fails, the unit is committed with the branches that went through before
        the first error is raised, as :meth:`finish_many` would have left them.
        """
        if not branches:
            return
        _settle_deferred(unit)
        try:
            with _attempt_in(unit):
                self._finish_optimistically(unit, branches)
        except Exception:
            failures = self._finish_each(unit, branches)
            unit.info[_UNIT_HAS_WORK] = True
            if failures:
                unit.commit()
                raise failures[0] from None

    def _finish_each(self, conn: sa.Connection, branches: Sequence[Finish]) -> list[Exception]:
        failures: list[Exception] = []
        for tx_id, op, _args, commit in branches:
            savepoint = conn.begin_nested()
            try:
                self._decide_in(conn, tx_id, op, "committed" if commit else "aborted")
            except Exception as exc:
                savepoint.rollback()
                failures.append(exc)
            else:
                savepoint.commit()
        return failures

    def shares_database(self, url: str) -> bool:
        """Whether ``url`` (a log's) names this resource's database."""
        try:
            theirs = sa.make_url(database_url(url))
        except ConfigurationError:
            return False
        return theirs.render_as_string(False) == self._engine.url.render_as_string(False)

    def begin_unit(self) -> sa.Connection:
        """A connection in an open transaction, for ``*_in`` calls and log records: one commit
        makes the batch's branches and records durable together. The caller commits, closes."""
        conn = self._engine.connect()
        conn.begin()
        conn.info[_UNIT_HAS_WORK] = False
        pgbatch.discard(conn)  # nothing of an earlier unit on this connection is sent
        return conn

    def _finish_optimistically(self, conn: sa.Connection, branches: Sequence[Finish]) -> None:
        """One UPDATE ... RETURNING per outcome changes the prepared rows and reads their args;
        a branch it did not change is looked at only then (done before, or a hazard)."""
        for outcome in ("committed", "aborted"):
            first: dict[str, Finish] = {}  # a branch listed twice is finished once
            for branch in branches:
                if (branch[3] is True) == (outcome == "committed"):
                    first.setdefault(branch[0], branch)
            if not first:
                continue
            ids, wanted = list(first), list(first.values())
            changed = self._decide_many(conn, ids, outcome)
            unchanged = [tx_id for tx_id in ids if tx_id not in changed]
            states = self._states(conn, unchanged) if unchanged else {}
            by_operation: dict[str, tuple[OperationSpec, list[dict[str, Any]]]] = {}
            for tx_id, op, _args, _commit in wanted:
                row = changed.get(tx_id)
                if row is None:
                    state = states.get(tx_id)
                    if state == outcome or (state is None and outcome == "aborted"):
                        continue  # done before, or an abort of a branch never prepared here
                    raise ResourceError(f"cannot finish {tx_id!r}: it is {state}")
                if op is None or op.name != row.operation:
                    raise ResourceError(f"{tx_id!r} needs operation {row.operation!r}")
                by_operation.setdefault(op.name, (op, []))[1].append(json.loads(row.args))
            for op, args_list in by_operation.values():
                hook = op.hook(outcome == "committed")
                if hook is not None:
                    hook(conn, args_list)

    def _decide_many(
        self, conn: sa.Connection, ids: list[str], outcome: str
    ) -> dict[str, _Decided]:
        """Move the prepared ones of ``ids`` to ``outcome``: what each changed row held."""
        if pgbatch.is_postgres(conn):
            rows = pgbatch.fetch(conn, _PG_DECIDE, (outcome, self._bound(), ids))
            return {row[0]: _Decided(*row) for row in rows}
        params = {"of_participant": self._bound(), "tx_ids": ids, "new_state": outcome}
        return {
            row.tx_id: _Decided(row.tx_id, row.operation, row.args)
            for row in conn.execute(_statements(conn.dialect.name).decide, params)
        }

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
        hook = op.hook(outcome == "committed")
        if hook is not None:
            hook(conn, [json.loads(row.args)])
