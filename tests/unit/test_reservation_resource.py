"""ReservationResource on a SQLite file: holds checked at prepare, applied exactly once."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from participant.operations import OperationSpec, Refuse
from participant.reservation import ReservationResource
from participant.resources import Resource
from runtime.errors import ResourceError

ACCOUNTS = "CREATE TABLE accounts (id TEXT PRIMARY KEY, balance BIGINT NOT NULL)"
HOLDS = "CREATE TABLE holds (hold TEXT PRIMARY KEY, account TEXT NOT NULL, amount BIGINT NOT NULL)"


def _prepare(conn: sa.Connection, args: dict[str, Any]) -> None:
    balance = conn.execute(
        sa.text("SELECT balance FROM accounts WHERE id = :account"), args
    ).scalar_one_or_none()
    if balance is None:
        raise Refuse(f"no account {args['account']}")
    held = conn.execute(
        sa.text("SELECT COALESCE(SUM(amount), 0) FROM holds WHERE account = :account"), args
    ).scalar_one()
    if balance - held < args["amount"]:
        raise Refuse("insufficient funds")
    conn.execute(sa.text("INSERT INTO holds VALUES (:hold, :account, :amount)"), args)


def _on_commit(conn: sa.Connection, args: dict[str, Any]) -> None:
    conn.execute(
        sa.text("UPDATE accounts SET balance = balance - :amount WHERE id = :account"), args
    )
    conn.execute(sa.text("DELETE FROM holds WHERE hold = :hold"), args)


def _on_abort(conn: sa.Connection, args: dict[str, Any]) -> None:
    conn.execute(sa.text("DELETE FROM holds WHERE hold = :hold"), args)


DEBIT = OperationSpec("debit", _prepare, _on_commit, _on_abort)


def args(tx: str, amount: int = 30, account: str = "alice") -> dict[str, Any]:
    return {"hold": tx, "account": account, "amount": amount}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "bank.db"
    with sqlite3.connect(path) as conn:
        conn.execute(ACCOUNTS)
        conn.execute(HOLDS)
        conn.execute("INSERT INTO accounts VALUES ('alice', 100), ('bob', 0)")
    return path


@pytest.fixture
def opened(db: Path) -> Any:
    resources: list[ReservationResource] = []

    def open_(participant: str = "bank", url: str | None = None) -> ReservationResource:
        res = ReservationResource(url or f"sqlite:///{db}")
        res.bind(participant)
        resources.append(res)
        return res

    yield open_
    for res in resources:
        res.close()


def balance(db: Path, account: str = "alice") -> int:
    with sqlite3.connect(db) as conn:
        return int(
            conn.execute("SELECT balance FROM accounts WHERE id = ?", (account,)).fetchone()[0]
        )


def holds(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM holds").fetchone()[0])


def states(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT tx_id, state FROM twophase_reservation").fetchall())


def test_commit_applies_exactly_once_also_after_restart(db: Path, opened: Any) -> None:
    res = opened()
    assert isinstance(res, Resource)
    res.prepare("tx1", DEBIT, args("tx1"))
    assert (balance(db), holds(db), states(db)) == (100, 1, {"tx1": "prepared"})
    res.commit("tx1", DEBIT, args("tx1"))
    res.commit("tx1", DEBIT, args("tx1"))
    opened().commit("tx1", DEBIT, args("tx1"))
    assert (balance(db), holds(db), states(db)) == (70, 0, {"tx1": "committed"})
    assert res.committed(["tx1", "other"]) == {"tx1"}
    assert res.prepared() == set()


def test_abort_releases_the_hold_once(db: Path, opened: Any) -> None:
    res = opened()
    res.prepare("tx1", DEBIT, args("tx1", 80))
    with pytest.raises(Refuse, match="insufficient funds"):  # the hold counts
        res.prepare("tx2", DEBIT, args("tx2", 80))
    res.abort("tx1", DEBIT, args("tx1", 80))
    res.abort("tx1", DEBIT, args("tx1", 80))
    opened().abort("tx1", None, {})  # decided already: op not needed
    res.abort("never-seen", None, {})
    assert (balance(db), holds(db), states(db)) == (100, 0, {"tx1": "aborted"})
    res.prepare("tx2", DEBIT, args("tx2", 80))  # the released hold no longer counts
    assert holds(db) == 1


def test_refuse_rolls_back_and_is_reraised(db: Path, opened: Any) -> None:
    res = opened()
    with pytest.raises(Refuse) as info:
        res.prepare("tx1", DEBIT, args("tx1", account="nobody"))
    assert info.value.reason == "no account nobody"
    assert (holds(db), states(db), res.prepared()) == (0, {}, set())


def test_other_exception_becomes_refuse_and_rolls_back(db: Path, opened: Any) -> None:
    def boom(conn: sa.Connection, a: dict[str, Any]) -> None:
        _prepare(conn, a)
        raise KeyError("missing")

    with pytest.raises(Refuse) as info:
        opened().prepare("tx1", OperationSpec("boom", boom), args("tx1"))
    assert info.value.reason == "KeyError: 'missing'"
    assert (holds(db), states(db)) == (0, {})


def test_args_must_be_json(opened: Any) -> None:
    with pytest.raises(Refuse, match=r"^TypeError: "):
        opened().prepare("tx1", DEBIT, {"hold": "tx1", "when": object()})


def test_prepared_survives_restart_and_hooks_get_stored_args(db: Path, opened: Any) -> None:
    first = opened()
    first.prepare("tx1", DEBIT, args("tx1", 25))
    first.prepare("tx1", DEBIT, args("tx1", 25))  # idempotent: one hold
    first.close()
    second = opened()
    assert second.prepared() == {"tx1"}
    assert second.committed(["tx1"]) == set()
    second.commit("tx1", DEBIT, {})  # args come from the reservation row
    assert (balance(db), holds(db)) == (75, 0)
    second.prepare("tx1", DEBIT, args("tx1", 25))  # committed: no-op, no new hold
    assert (balance(db), holds(db), second.prepared()) == (75, 0, set())


def test_heuristic_outcomes_raise(opened: Any) -> None:
    res = opened()
    with pytest.raises(ResourceError, match="not prepared here"):
        res.commit("ghost", DEBIT, {})
    res.prepare("c", DEBIT, args("c", 10))
    res.commit("c", DEBIT, {})
    with pytest.raises(ResourceError, match="it is committed"):
        res.abort("c", DEBIT, {})
    res.prepare("a", DEBIT, args("a", 10))
    res.abort("a", DEBIT, {})
    with pytest.raises(ResourceError, match="it is aborted"):
        res.commit("a", DEBIT, {})
    with pytest.raises(Refuse, match="already aborted"):
        res.prepare("a", DEBIT, args("a", 10))
    assert res.committed(["c", "a", "ghost"]) == {"c"}


def test_unknown_or_wrong_operation_keeps_the_hold(db: Path, opened: Any) -> None:
    res = opened()
    res.prepare("tx1", DEBIT, args("tx1"))
    with pytest.raises(ResourceError, match="needs operation 'debit'"):
        res.abort("tx1", None, {})
    with pytest.raises(ResourceError, match="needs operation 'debit'"):
        res.commit("tx1", OperationSpec("credit", _prepare), {})
    assert (states(db), holds(db)) == ({"tx1": "prepared"}, 1)


def test_failing_hook_leaves_the_transaction_prepared(db: Path, opened: Any) -> None:
    calls: list[dict[str, Any]] = []

    def flaky(conn: sa.Connection, a: dict[str, Any]) -> None:
        _on_commit(conn, a)
        calls.append(a)
        if len(calls) == 1:
            raise RuntimeError("disk full")

    res = opened()
    res.prepare("tx1", DEBIT, args("tx1"))
    op = OperationSpec("debit", _prepare, flaky, _on_abort)
    with pytest.raises(RuntimeError):
        res.commit("tx1", op, {})
    assert (balance(db), holds(db), res.prepared()) == (100, 1, {"tx1"})
    res.commit("tx1", op, {})
    assert (balance(db), holds(db), res.committed(["tx1"])) == (70, 0, {"tx1"})


def test_hooks_are_optional(db: Path, opened: Any) -> None:
    res = opened()
    bare = OperationSpec("note", lambda conn, a: None)
    res.prepare("tx1", bare, {})
    res.prepare("tx2", bare, {})
    res.commit("tx1", bare, {})
    res.abort("tx2", bare, {})
    assert states(db) == {"tx1": "committed", "tx2": "aborted"}


def test_participants_share_one_database(opened: Any) -> None:
    a, b = opened("a"), opened("b")
    a.prepare("tx1", DEBIT, args("tx1-a", 10))
    b.prepare("tx1", DEBIT, args("tx1-b", 10))
    b.prepare("tx2", DEBIT, args("tx2-b", 10))
    a.commit("tx1", DEBIT, {})
    assert (a.prepared(), b.prepared()) == (set(), {"tx1", "tx2"})
    assert (a.committed(["tx1"]), b.committed(["tx1"])) == ({"tx1"}, set())


def test_sqlite_connections_are_durable_and_serialized(db: Path, opened: Any) -> None:
    seen: dict[str, Any] = {}

    def probe(conn: sa.Connection, a: dict[str, Any]) -> None:
        for pragma in ("journal_mode", "synchronous", "busy_timeout"):
            seen[pragma] = conn.exec_driver_sql(f"PRAGMA {pragma}").scalar()
        other = sqlite3.connect(db, timeout=0)
        try:
            other.execute("INSERT INTO accounts VALUES ('x', 1)")
        except sqlite3.OperationalError as exc:
            seen["other writer"] = str(exc)
        finally:
            other.close()

    opened(url=str(db)).prepare("tx1", OperationSpec("probe", probe), {})  # a bare path
    assert seen == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL
        "busy_timeout": 10000,
        "other writer": "database is locked",  # BEGIN IMMEDIATE before the handler's reads
    }


def test_sqlite_busy_timeout_is_the_resources_and_foreign_keys_are_the_applications(
    db: Path,
) -> None:
    seen: dict[str, Any] = {}

    def probe(conn: sa.Connection, a: dict[str, Any]) -> None:
        for pragma in ("busy_timeout", "foreign_keys"):
            seen[pragma] = conn.exec_driver_sql(f"PRAGMA {pragma}").scalar()

    res = ReservationResource(str(db), busy_timeout=2.5)
    try:
        res.bind("bank")
        res.prepare("tx1", OperationSpec("probe", probe), {})
    finally:
        res.close()
    assert seen == {"busy_timeout": 2500, "foreign_keys": 0}


def test_a_relative_path_is_the_same_database_as_the_logs(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(db.parent)
    res = ReservationResource(db.name)
    try:
        assert res.shares_database(db.name)  # normalised as the log's URL is: one unit of work
        assert res.shares_database(f"sqlite:///{db}")
        assert not res.shares_database("other.db")
    finally:
        res.close()


def test_bind_is_required_and_checked(db: Path) -> None:
    res = ReservationResource(str(db))
    try:
        with pytest.raises(ResourceError, match=r"bind\(participant\)"):
            res.prepare("tx1", DEBIT, args("tx1"))
        with pytest.raises(ResourceError, match="participant name"):
            res.bind("")
        res.bind("bank")
        res.bind("bank")  # again with the same name: fine
        with pytest.raises(ResourceError, match="already bound"):
            res.bind("other")
    finally:
        res.close()


def hold_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT hold FROM holds ORDER BY hold")]


def test_a_batch_prepares_in_one_transaction_and_a_refusal_undoes_only_its_own_branch(
    opened: Any, db: Path
) -> None:
    res = opened()
    results = res.prepare_many(
        [
            ("t1", DEBIT, args("t1", 40)),
            ("t2", DEBIT, args("t2", 70)),
            ("t3", DEBIT, args("t3", 60)),
        ]
    )
    # t2 sees t1's hold in the same transaction: 100 - 40 < 70
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], Refuse) and results[1].reason == "insufficient funds"
    assert hold_ids(db) == ["t1", "t3"]
    assert res.prepared() == {"t1", "t3"}


def test_a_batch_finishes_in_one_transaction_exactly_once(opened: Any, db: Path) -> None:
    res = opened()
    res.prepare_many([("t1", DEBIT, args("t1", 10)), ("t2", DEBIT, args("t2", 20))])
    batch = [("t1", DEBIT, args("t1"), True), ("t2", DEBIT, args("t2"), False)]
    res.finish_many(batch)
    res.finish_many(batch)  # a redelivered batch changes nothing
    assert balance(db) == 90
    assert hold_ids(db) == []
    assert res.committed(["t1", "t2"]) == {"t1"}


def test_a_failing_hook_leaves_its_branch_prepared_and_lets_the_others_finish(
    opened: Any, db: Path
) -> None:
    def broken(conn: sa.Connection, args: dict[str, Any]) -> None:
        raise RuntimeError("hook is broken")

    broken_debit = OperationSpec("debit", _prepare, broken, _on_abort)
    res = opened()
    res.prepare_many([("t1", DEBIT, args("t1", 10)), ("t2", DEBIT, args("t2", 20))])
    with pytest.raises(RuntimeError, match="hook is broken"):
        res.finish_many([("t1", broken_debit, args("t1"), True), ("t2", DEBIT, args("t2"), True)])
    assert res.prepared() == {"t1"}
    assert res.committed(["t1", "t2"]) == {"t2"}
    assert balance(db) == 80


@pytest.mark.parametrize("prior_work", [False, True], ids=["fresh-unit", "unit-with-work"])
def test_in_a_unit_a_refusal_undoes_only_its_own_branch(
    opened: Any, db: Path, prior_work: bool
) -> None:
    res = opened()
    res.prepare_many([("t0", DEBIT, args("t0", 5))])
    unit = res.begin_unit()
    if prior_work:  # the refusal below must not roll this back
        res.finish_many_in(unit, [("t0", DEBIT, args("t0"), True)])
    results = res.prepare_many_in(
        unit,
        [
            ("t1", DEBIT, args("t1", 40)),
            ("t2", DEBIT, args("t2", 70)),  # 95 - 40 < 70
            ("t3", DEBIT, args("t3", 50)),
        ],
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], Refuse)
    assert hold_ids(db) == ["t0"]  # nothing of the unit is visible before its commit
    unit.commit()
    unit.close()
    assert hold_ids(db) == (["t1", "t3"] if prior_work else ["t0", "t1", "t3"])
    assert res.committed(["t0"]) == ({"t0"} if prior_work else set())
    assert balance(db) == (95 if prior_work else 100)


@pytest.mark.parametrize("prior_work", [False, True], ids=["fresh-unit", "unit-with-work"])
def test_in_a_unit_a_failing_hook_commits_the_others_then_raises(
    opened: Any, db: Path, prior_work: bool
) -> None:
    def broken(conn: sa.Connection, args: dict[str, Any]) -> None:
        raise RuntimeError("hook is broken")

    res = opened()
    res.prepare_many([(tx, DEBIT, args(tx, 10)) for tx in ("t1", "t2", "t3")])
    unit = res.begin_unit()
    if prior_work:
        assert res.prepare_many_in(unit, [("t4", DEBIT, args("t4", 1))]) == [None]
    broken_debit = OperationSpec("debit", _prepare, broken, _on_abort)
    with pytest.raises(RuntimeError, match="hook is broken"):
        res.finish_many_in(
            unit, [("t1", broken_debit, args("t1"), True), ("t2", DEBIT, args("t2"), True)]
        )
    unit.close()
    assert res.prepared() == {"t1", "t3"} | ({"t4"} if prior_work else set())
    assert res.committed(["t1", "t2", "t3"]) == {"t2"}
    assert balance(db) == 90


def test_a_branch_listed_twice_in_a_batch_is_finished_once(opened: Any, db: Path) -> None:
    res = opened()
    res.prepare_many([("t1", DEBIT, args("t1", 10))])
    res.finish_many([("t1", DEBIT, args("t1"), True), ("t1", DEBIT, args("t1"), True)])
    assert balance(db) == 90
    with pytest.raises(ResourceError, match="heuristic hazard"):
        res.finish_many([("t1", DEBIT, args("t1"), False)])  # committed: an abort contradicts it


def test_healthy_batches_need_no_second_attempt(
    opened: Any, db: Path, forbid_fallback: Callable[[Any], None]
) -> None:
    res = opened()
    forbid_fallback(res)
    assert res.prepare_many([("t1", DEBIT, args("t1", 10)), ("t2", DEBIT, args("t2", 20))]) == [
        None,
        None,
    ]
    res.finish_many([("t1", DEBIT, args("t1"), True), ("t2", DEBIT, args("t2"), False)])
    unit = res.begin_unit()
    assert res.prepare_many_in(unit, [("t3", DEBIT, args("t3", 5))]) == [None]
    res.finish_many_in(unit, [("t3", DEBIT, args("t3"), True)])
    unit.commit()
    unit.close()
    assert balance(db) == 85


def test_batch_hooks_get_a_batchs_branches_in_one_call(opened: Any, db: Path) -> None:
    calls: list[tuple[str, list[str]]] = []

    def commit_many(conn: sa.Connection, args_list: list[dict[str, Any]]) -> None:
        calls.append(("commit", [a["hold"] for a in args_list]))
        for a in args_list:
            _on_commit(conn, a)

    def abort_many(conn: sa.Connection, args_list: list[dict[str, Any]]) -> None:
        calls.append(("abort", [a["hold"] for a in args_list]))
        for a in args_list:
            _on_abort(conn, a)

    batched = OperationSpec("debit", _prepare, on_commit_many=commit_many, on_abort_many=abort_many)
    res = opened()
    res.prepare_many([(tx, batched, args(tx, 10)) for tx in ("t1", "t2", "t3", "t4")])
    res.finish_many(
        [
            ("t1", batched, args("t1"), True),
            ("t2", batched, args("t2"), False),
            ("t3", batched, args("t3"), True),
        ]
    )
    assert calls == [("commit", ["t1", "t3"]), ("abort", ["t2"])]
    assert balance(db) == 80 and hold_ids(db) == ["t4"]
    calls.clear()
    res.commit("t4", batched, args("t4"))  # one branch alone: a batch of one
    assert calls == [("commit", ["t4"])]
    assert balance(db) == 70


def test_a_failing_batch_hook_is_retried_branch_by_branch(opened: Any, db: Path) -> None:
    def commit_many(conn: sa.Connection, args_list: list[dict[str, Any]]) -> None:
        if any(a["hold"] == "t2" for a in args_list):
            raise RuntimeError("t2 cannot be applied")
        for a in args_list:
            _on_commit(conn, a)

    batched = OperationSpec("debit", _prepare, on_commit_many=commit_many)
    res = opened()
    res.prepare_many([(tx, batched, args(tx, 10)) for tx in ("t1", "t2", "t3")])
    with pytest.raises(RuntimeError, match="t2 cannot be applied"):
        res.finish_many([(tx, batched, args(tx), True) for tx in ("t1", "t2", "t3")])
    assert res.committed(["t1", "t2", "t3"]) == {"t1", "t3"}
    assert res.prepared() == {"t2"}
    assert balance(db) == 80


def test_a_batch_handler_prepares_a_batchs_branches_in_one_call(opened: Any, db: Path) -> None:
    calls: list[list[str]] = []

    def prepare_many(conn: sa.Connection, args_list: list[dict[str, Any]]) -> list[Refuse | None]:
        calls.append([a["hold"] for a in args_list])
        out: list[Refuse | None] = []
        for a in args_list:
            try:
                _prepare(conn, a)
                out.append(None)
            except Refuse as refusal:  # _prepare refuses before it writes
                out.append(refusal)
        return out

    batched = OperationSpec("debit", _prepare, _on_commit, _on_abort, prepare_many=prepare_many)
    res = opened()
    assert res.prepare_many([("t0", batched, args("t0", 10))]) == [None]
    results = res.prepare_many(
        [
            ("t0", batched, args("t0", 10)),  # prepared before: not run again
            ("t1", batched, args("t1", 40)),
            ("t2", batched, args("t2", 70)),  # 100 - 10 - 40 < 70
            ("t1", batched, args("t1", 40)),  # listed twice: answered once
            ("t3", batched, args("t3", 60)),
        ]
    )
    assert calls == [["t0"], ["t1", "t2", "t3"]]
    assert results[0] is None and results[1] is None and results[3] is None
    assert isinstance(results[2], Refuse) and results[2].reason == "insufficient funds"
    assert isinstance(results[4], Refuse)  # 100 - 10 - 40 < 60
    assert hold_ids(db) == ["t0", "t1"]
    assert res.prepared() == {"t0", "t1"}


def test_a_raising_batch_handler_sends_the_batch_branch_by_branch(opened: Any, db: Path) -> None:
    def prepare_many(conn: sa.Connection, args_list: list[dict[str, Any]]) -> list[Refuse | None]:
        for a in args_list:
            _prepare(conn, a)
        raise RuntimeError("the batch handler gave up half-way")

    batched = OperationSpec("debit", _prepare, _on_commit, _on_abort, prepare_many=prepare_many)
    res = opened()
    results = res.prepare_many([("t1", batched, args("t1", 40)), ("t2", batched, args("t2", 70))])
    assert results[0] is None and isinstance(results[1], Refuse)
    assert hold_ids(db) == ["t1"]  # the batch handler's writes were rolled back
