"""Behaviour of the participant resources against a real PostgreSQL (and SQLite for comparison).

The same bank tests run on PostgresResource (native PREPARE TRANSACTION), ReservationResource on
PostgreSQL and ReservationResource on SQLite. Every test uses its own participant names and
tables, rolls back the prepared transactions it created and drops its tables.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from participant.operations import OperationSpec, Refuse
from participant.reservation import ReservationResource
from participant.resources import PostgresResource, Resource, check_max_prepared_transactions
from runtime import pgbatch, store
from runtime.errors import ResourceError
from runtime.redaction import redact_url

pytestmark = pytest.mark.integration

PG_URL = os.environ.get("TWOPHASE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
KINDS = ["postgres", "reservation-pg", "reservation-sqlite"]
# alice = 100, bob = 0, a0..a9 = 100 each. Native branches lock the rows they update, so
# transactions in flight at the same time debit different accounts.
ACCOUNTS = ", ".join(["('alice', 100)", "('bob', 0)", *(f"('a{i}', 100)" for i in range(10))])


@pytest.fixture(scope="module")
def pg_url() -> str:
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {redact_url(PG_URL)} is unreachable in CI: {exc}")
        pytest.skip(f"PostgreSQL at {redact_url(PG_URL)} is unreachable: {exc}")
    return PG_URL


def admin_exec(
    url: str, query: str | sql.Composed, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def finish_prepared(url: str, action: str, gid: str) -> None:
    """COMMIT or ROLLBACK PREPARED behind the resource's back (as an operator would)."""
    query = sql.SQL(action + " PREPARED {}").format(gid)
    admin_exec(url, query)


def gids(url: str, prefix: str) -> list[str]:
    rows = admin_exec(
        url, "SELECT gid FROM pg_prepared_xacts WHERE starts_with(gid, %s)", (prefix,)
    )
    return [gid for (gid,) in rows]


@dataclass
class Bank:
    """accounts(id, balance) (see ACCOUNTS); ``debit`` takes money out of an account."""

    kind: str
    url: str
    participant: str
    debit: OperationSpec
    boom: OperationSpec
    balance: Callable[[str], int]
    holds: Callable[[], int]
    dispose: Callable[[], None] = lambda: None
    resources: list[Resource] = field(default_factory=list)

    def resource(self, participant: str | None = None, **kw: Any) -> Resource:
        res: Resource
        if self.kind == "postgres":
            res = PostgresResource(self.url, **kw)
        else:
            res = ReservationResource(self.url, **kw)
        res.bind(participant or self.participant)
        self.resources.append(res)
        return res


def native_bank(url: str, participant: str, acc: str) -> Bank:
    admin_exec(url, f"CREATE TABLE {acc} (id text PRIMARY KEY, balance bigint NOT NULL)")
    admin_exec(url, f"INSERT INTO {acc} VALUES {ACCOUNTS}")

    def debit(conn: psycopg.Connection[Any], args: dict[str, Any]) -> None:
        cur = conn.execute(
            f"UPDATE {acc} SET balance = balance - %s WHERE id = %s AND balance >= %s",
            (args["amount"], args["account"], args["amount"]),
        )
        if cur.rowcount != 1:
            raise Refuse("insufficient funds")

    def boom(conn: psycopg.Connection[Any], args: dict[str, Any]) -> None:
        conn.execute(f"UPDATE {acc} SET balance = balance - 1")
        raise ZeroDivisionError("division by zero")

    def balance(account: str) -> int:
        return int(admin_exec(url, f"SELECT balance FROM {acc} WHERE id = %s", (account,))[0][0])

    debit_op, boom_op = OperationSpec("debit", debit), OperationSpec("boom", boom)
    return Bank("postgres", url, participant, debit_op, boom_op, balance, lambda: 0)


def reservation_bank(kind: str, url: str, participant: str, acc: str, holds: str) -> Bank:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {acc} (id text PRIMARY KEY, balance bigint NOT NULL)"))
        conn.execute(sa.text(f"INSERT INTO {acc} VALUES {ACCOUNTS}"))
        hold_columns = "hold text PRIMARY KEY, account text NOT NULL, amount bigint NOT NULL"
        conn.execute(sa.text(f"CREATE TABLE {holds} ({hold_columns})"))

    def prepare(conn: sa.Connection, args: dict[str, Any]) -> None:
        lock = " FOR UPDATE" if conn.dialect.name == "postgresql" else ""
        row = conn.execute(
            sa.text(f"SELECT balance FROM {acc} WHERE id = :id{lock}"), {"id": args["account"]}
        ).first()
        if row is None:
            raise Refuse("no such account")
        held = conn.execute(
            sa.text(f"SELECT COALESCE(SUM(amount), 0) FROM {holds} WHERE account = :id"),
            {"id": args["account"]},
        ).scalar_one()
        if row.balance - held < args["amount"]:
            raise Refuse("insufficient funds")
        conn.execute(sa.text(f"INSERT INTO {holds} VALUES (:hold, :account, :amount)"), args)

    def on_commit(conn: sa.Connection, args: dict[str, Any]) -> None:
        conn.execute(
            sa.text(f"UPDATE {acc} SET balance = balance - :amount WHERE id = :account"), args
        )
        conn.execute(sa.text(f"DELETE FROM {holds} WHERE hold = :hold"), args)

    def on_abort(conn: sa.Connection, args: dict[str, Any]) -> None:
        conn.execute(sa.text(f"DELETE FROM {holds} WHERE hold = :hold"), args)

    def boom(conn: sa.Connection, args: dict[str, Any]) -> None:
        conn.execute(sa.text(f"INSERT INTO {holds} VALUES (:hold, :account, :amount)"), args)
        raise ZeroDivisionError("division by zero")

    def balance(account: str) -> int:
        with engine.connect() as conn:
            q = sa.text(f"SELECT balance FROM {acc} WHERE id = :id")
            return int(conn.execute(q, {"id": account}).scalar_one())

    def count_holds() -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {holds}")).scalar_one())

    debit_op = OperationSpec("debit", prepare, on_commit, on_abort)
    boom_op = OperationSpec("boom", boom)
    return Bank(kind, url, participant, debit_op, boom_op, balance, count_holds, engine.dispose)


@pytest.fixture
def token() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=KINDS)
def bank(request: pytest.FixtureRequest, token: str, tmp_path: Path) -> Iterator[Bank]:
    kind: str = request.param
    acc, holds, participant = f"acc_{token}", f"holds_{token}", f"{token}-bank"
    if kind == "reservation-sqlite":
        b = reservation_bank(kind, f"sqlite:///{tmp_path / 'bank.db'}", participant, acc, holds)
        yield b
        for res in b.resources:
            res.close()
        b.dispose()
        return
    url = request.getfixturevalue("pg_url")
    try:
        if kind == "postgres":
            b = native_bank(url, participant, acc)
        else:
            b = reservation_bank(kind, url, participant, acc, holds)
        yield b
        for res in b.resources:
            res.close()
        b.dispose()
    finally:
        pg_cleanup(url, token, tables=[acc, holds])


def pg_cleanup(url: str, token: str, tables: list[str]) -> None:
    """Roll back this test's prepared transactions first (they hold locks), then drop its tables."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        for gid in gids(url, f"twophase:{token}"):
            conn.tpc_rollback(gid)
        for table in tables:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        for table in ("twophase_commit_marker", "twophase_reservation"):
            if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() != (None,):
                conn.execute(f"DELETE FROM {table} WHERE starts_with(participant, %s)", (token,))


def debit_args(tx: str, amount: int = 30, account: str = "alice") -> dict[str, Any]:
    return {"account": account, "amount": amount, "hold": tx}


# -- the same behaviour on every resource ------------------------------------------------------


def test_prepare_commit_applies_exactly_once(bank: Bank) -> None:
    res = bank.resource()
    assert isinstance(res, Resource)
    res.prepare("tx1", bank.debit, debit_args("tx1"))
    assert bank.balance("alice") == 100  # prepared, not yet applied
    assert bank.holds() == (0 if bank.kind == "postgres" else 1)
    res.commit("tx1", bank.debit, debit_args("tx1"))
    res.commit("tx1", bank.debit, debit_args("tx1"))
    bank.resource().commit("tx1", bank.debit, debit_args("tx1"))  # after a "restart"
    assert bank.balance("alice") == 70
    assert bank.holds() == 0
    assert res.prepared() == set()
    assert bank.resource().committed(["tx1", "nope"]) == {"tx1"}


def test_prepare_abort_leaves_nothing(bank: Bank) -> None:
    res = bank.resource()
    res.prepare("tx1", bank.debit, debit_args("tx1"))
    assert res.prepared() == {"tx1"}
    res.abort("tx1", bank.debit, debit_args("tx1"))
    res.abort("tx1", bank.debit, debit_args("tx1"))
    bank.resource().abort("tx1", None, {})
    res.abort("never-prepared", None, {})
    assert bank.balance("alice") == 100
    assert bank.holds() == 0
    assert res.prepared() == set()
    assert res.committed(["tx1"]) == set()
    if bank.kind != "reservation-sqlite":
        assert gids(bank.url, f"twophase:{bank.participant}:") == []


def test_refuse_from_handler_rolls_back_and_is_reraised(bank: Bank) -> None:
    res = bank.resource()
    with pytest.raises(Refuse) as info:
        res.prepare("tx1", bank.debit, debit_args("tx1", amount=500))
    assert info.value.reason == "insufficient funds"
    assert res.prepared() == set()
    assert bank.balance("alice") == 100
    assert bank.holds() == 0
    res.prepare("tx2", bank.debit, debit_args("tx2"))  # the resource is still usable
    res.commit("tx2", bank.debit, debit_args("tx2"))
    assert bank.balance("alice") == 70


def test_other_exception_becomes_refuse_with_type_name(bank: Bank) -> None:
    res = bank.resource()
    with pytest.raises(Refuse) as info:
        res.prepare("tx1", bank.boom, debit_args("tx1"))
    assert info.value.reason == "ZeroDivisionError: division by zero"
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert res.prepared() == set()
    assert bank.balance("alice") == 100
    assert bank.holds() == 0


def test_prepared_survives_restart_and_commits_from_new_instance(bank: Bank) -> None:
    first = bank.resource()
    first.prepare("tx1", bank.debit, debit_args("tx1"))
    first.prepare("tx1", bank.debit, debit_args("tx1"))  # idempotent
    first.close()  # the "crash": the prepared branch must survive it
    second = bank.resource()
    assert second.prepared() == {"tx1"}
    assert second.committed(["tx1"]) == set()
    second.prepare("tx1", bank.debit, debit_args("tx1"))  # still a no-op
    second.commit("tx1", bank.debit, debit_args("tx1"))
    assert second.prepared() == set()
    assert second.committed(["tx1"]) == {"tx1"}
    assert bank.balance("alice") == 70
    second.prepare("tx1", bank.debit, debit_args("tx1"))  # committed: still a no-op
    assert bank.balance("alice") == 70
    assert second.prepared() == set()


def test_committed_is_decided_by_the_marker(bank: Bank) -> None:
    res = bank.resource()
    c, p, a = "c'; DROP TABLE x; --", "p-ü-€", "a_%"  # tx ids are opaque strings
    for i, tx in enumerate((c, p, a)):
        res.prepare(tx, bank.debit, debit_args(tx, 10, f"a{i}"))
    res.commit(c, bank.debit, debit_args(c, 10, "a0"))
    res.abort(a, bank.debit, debit_args(a, 10, "a2"))
    assert res.committed([c, p, a, "unknown"]) == {c}
    assert res.committed([]) == set()
    assert bank.resource().prepared() == {p}
    assert [bank.balance(f"a{i}") for i in range(3)] == [90, 100, 100]


def test_commit_of_a_never_prepared_branch_is_a_hazard(bank: Bank) -> None:
    res = bank.resource()
    with pytest.raises(ResourceError, match="heuristic hazard"):
        res.commit("ghost", bank.debit, debit_args("ghost"))
    res.prepare("tx1", bank.debit, debit_args("tx1"))
    res.commit("tx1", bank.debit, debit_args("tx1"))
    with pytest.raises(ResourceError, match="committed"):
        res.abort("tx1", bank.debit, debit_args("tx1"))


def test_participants_sharing_a_database_are_separate(bank: Bank) -> None:
    a = bank.resource(f"{bank.participant}-a")
    b = bank.resource(f"{bank.participant}-b")
    a.prepare("tx1", bank.debit, debit_args("tx1", 10, "a0"))
    b.prepare("tx2", bank.debit, debit_args("tx2", 10, "a1"))
    b.prepare("tx1", bank.debit, debit_args("tx1-b", 10, "a2"))  # same tx_id, other participant
    assert a.prepared() == {"tx1"}
    assert b.prepared() == {"tx1", "tx2"}
    a.commit("tx1", bank.debit, {})
    assert b.committed(["tx1", "tx2"]) == set()
    b.abort("tx2", bank.debit, {})
    b.commit("tx1", bank.debit, {})
    assert [bank.balance(f"a{i}") for i in range(3)] == [90, 100, 90]


def test_resource_must_be_bound_first(bank: Bank) -> None:
    res = PostgresResource(bank.url) if bank.kind == "postgres" else ReservationResource(bank.url)
    try:
        with pytest.raises(ResourceError, match=r"bind\(participant\)"):
            res.prepare("tx1", bank.debit, debit_args("tx1"))
        with pytest.raises(ResourceError, match=r"bind\(participant\)"):
            res.prepared()
    finally:
        res.close()


# -- PostgresResource only ---------------------------------------------------------------------


def test_max_prepared_transactions_check() -> None:
    url = "postgresql://app:s3cret@db.example:5432/bank"
    with pytest.raises(ResourceError) as info:
        check_max_prepared_transactions(url, "0")
    assert str(info.value) == (
        "PostgreSQL at postgresql://app:***@db.example:5432/bank has max_prepared_transactions = 0;"
        " native two-phase commit needs it > 0: ALTER SYSTEM SET max_prepared_transactions = 200"
        " and restart the server"
    )
    check_max_prepared_transactions(url, "200")
    check_max_prepared_transactions(url, 1)


def test_bind_checks_participant_name(pg_url: str, token: str) -> None:
    for bad in ("", "a:b", "x" * 130):
        res = PostgresResource(pg_url)
        with pytest.raises(ResourceError, match="participant name"):
            res.bind(bad)
        res.close()
    res = PostgresResource(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        res.bind(f"{token}-ok")  # the real server has max_prepared_transactions > 0
        assert res.prepared() == set()
    finally:
        res.close()
        pg_cleanup(pg_url, token, tables=[])


@pytest.mark.parametrize("bank", ["postgres"], indirect=True)
def test_too_long_tx_id_is_refused(bank: Bank) -> None:
    res = bank.resource()
    with pytest.raises(Refuse, match="too long"):
        res.prepare("x" * 200, bank.debit, debit_args("x"))
    res.abort("x" * 200, bank.debit, {})  # never prepared: no-op
    assert res.committed(["x" * 200]) == set()


@pytest.mark.parametrize("bank", ["postgres"], indirect=True)
def test_branch_rolled_back_behind_our_back_is_a_hazard(bank: Bank) -> None:
    res = bank.resource()
    res.prepare("tx1", bank.debit, debit_args("tx1"))
    res.prepare("tx2", bank.debit, debit_args("tx2", 10, "a0"))
    finish_prepared(bank.url, "ROLLBACK", f"twophase:{bank.participant}:tx1")
    finish_prepared(bank.url, "COMMIT", f"twophase:{bank.participant}:tx2")
    with pytest.raises(ResourceError, match="heuristic hazard"):
        res.commit("tx1", bank.debit, debit_args("tx1"))
    res.commit("tx2", bank.debit, {})  # committed elsewhere: the marker says so, no-op
    res.abort("tx1", bank.debit, {})  # rolled back: abort is a no-op
    assert (bank.balance("alice"), bank.balance("a0")) == (100, 90)


@pytest.mark.parametrize("bank", ["postgres"], indirect=True)
def test_lock_held_by_prepared_branch_times_out_into_refuse(bank: Bank) -> None:
    res = bank.resource(lock_timeout=0.2)
    res.prepare("tx1", bank.debit, debit_args("tx1", amount=10))
    with pytest.raises(Refuse, match="LockNotAvailable"):
        res.prepare("tx2", bank.debit, debit_args("tx2", amount=10))
    res.commit("tx1", bank.debit, debit_args("tx1", amount=10))
    res.prepare("tx2", bank.debit, debit_args("tx2", amount=10))
    res.commit("tx2", bank.debit, debit_args("tx2", amount=10))
    assert bank.balance("alice") == 80


@pytest.mark.parametrize("bank", ["postgres"], indirect=True)
def test_more_in_flight_branches_than_pool_size(bank: Bank) -> None:
    res = bank.resource(pool_size=2)
    txs = [f"tx{i}" for i in range(6)]
    for i, tx in enumerate(txs):
        res.prepare(tx, bank.debit, debit_args(tx, 5, f"a{i}"))
    assert res.prepared() == set(txs)
    assert len(gids(bank.url, f"twophase:{bank.participant}:")) == 6
    for tx in txs[:3]:
        res.commit(tx, bank.debit, {})
    for tx in txs[3:]:
        res.abort(tx, bank.debit, {})
    assert res.prepared() == set()
    assert res.committed(txs) == set(txs[:3])
    assert [bank.balance(f"a{i}") for i in range(6)] == [95, 95, 95, 100, 100, 100]


@pytest.mark.parametrize("bank", ["reservation-pg"], indirect=True)
def test_healthy_batches_in_a_unit_need_no_second_attempt(
    bank: Bank, forbid_fallback: Callable[[Any], None]
) -> None:
    """The batch statements (ANY(array) lookups, UPDATE ... RETURNING) work on PostgreSQL."""
    res = bank.resource()
    assert isinstance(res, ReservationResource)
    forbid_fallback(res)
    branches = [
        (f"u{i}", bank.debit, {"hold": f"u{i}", "account": "alice", "amount": 1}) for i in range(3)
    ]
    unit = res.begin_unit()
    assert res.prepare_many_in(unit, branches) == [None, None, None]
    unit.commit()
    unit.close()
    unit = res.begin_unit()
    res.finish_many_in(unit, [(tx, op, a, True) for tx, op, a in branches])
    unit.commit()
    unit.close()
    assert res.committed([tx for tx, _, _ in branches]) == {"u0", "u1", "u2"}


@pytest.mark.parametrize("bank", ["reservation-pg"], indirect=True)
def test_a_branch_prepared_then_aborted_in_one_unit_releases_its_hold(bank: Bank) -> None:
    """The reservations of a prepare wait for the unit's commit (one round trip with it); an
    abort later in the same unit must still find and release them."""
    res = bank.resource()
    assert isinstance(res, ReservationResource)
    unit = res.begin_unit()
    branch = ("p-then-a", bank.debit, {"hold": "p-then-a", "account": "alice", "amount": 7})
    assert res.prepare_many_in(unit, [branch]) == [None]
    res.finish_many_in(unit, [(*branch, False)])
    unit.commit()
    unit.close()
    assert res.prepared() == set()
    assert res.committed(["p-then-a"]) == set()
    assert bank.holds() == 0
    assert bank.balance("alice") == 100


@pytest.mark.parametrize("bank", ["reservation-pg"], indirect=True)
def test_a_rolled_back_unit_leaves_nothing_for_the_next_one(bank: Bank) -> None:
    res = bank.resource()
    assert isinstance(res, ReservationResource)
    unit = res.begin_unit()
    gone = ("gone", bank.debit, {"hold": "gone", "account": "alice", "amount": 5})
    assert res.prepare_many_in(unit, [gone]) == [None]
    unit.rollback()
    unit.close()
    unit = res.begin_unit()  # the same pooled connection (the only one checked in)
    kept = ("kept", bank.debit, {"hold": "kept", "account": "a1", "amount": 5})
    assert res.prepare_many_in(unit, [kept]) == [None]
    unit.commit()
    unit.close()
    assert res.prepared() == {"kept"}
    res.abort("kept", bank.debit, {"hold": "kept", "account": "a1", "amount": 5})


@pytest.mark.parametrize("bank", ["reservation-pg"], indirect=True)
def test_a_unit_whose_pipelined_commit_fails_leaves_nothing(bank: Bank) -> None:
    """The reservations and log records travel with the COMMIT: if any of it fails, nothing of
    the batch is durable, and the caller (the worker) raises before it publishes a vote."""
    res = bank.resource()
    assert isinstance(res, ReservationResource)
    unit = res.begin_unit()
    branch = ("lost", bank.debit, {"hold": "lost", "account": "alice", "amount": 3})
    assert res.prepare_many_in(unit, [branch]) == [None]
    pgbatch.defer(unit, ("SELECT 1 / 0", ()))  # stands for a log insert the server refuses
    with pytest.raises(sa.exc.DBAPIError, match="division by zero"):
        store.commit(unit)
    unit.close()
    assert res.prepared() == set()
    assert bank.holds() == 0
    assert bank.balance("alice") == 100
