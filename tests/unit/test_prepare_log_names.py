"""Participants whose names fold to the same SQL identifier keep apart in one log database."""

from __future__ import annotations

from pathlib import Path

import pytest

from participant.log import PrepareLog, legacy_table_name, table_name
from runtime.store import LogRow, RecordLog, make_engine
from schemas.codec import encode, record_kind
from schemas.records import BranchPrepared, ManualAction

NAMES = ("bank-a", "bank.a", "bank_a", "Bank-A")


def prepared(tx_id: str, participant: str) -> BranchPrepared:
    return BranchPrepared(
        tx_id=tx_id, participant=participant, operation="debit", args={}, deadline_ms=1
    )


def test_names_that_fold_alike_get_tables_of_their_own() -> None:
    assert len({legacy_table_name(n) for n in NAMES}) == 1  # the collision being fixed
    assert len({table_name(n) for n in NAMES}) == len(NAMES)
    assert all(len(table_name(n)) <= 63 for n in (*NAMES, "p" * 100))


def test_participants_sharing_a_log_database_recover_only_their_own_branches(
    tmp_path: Path,
) -> None:
    url = str(tmp_path / "shared.log.db")
    logs = {name: PrepareLog(url, name) for name in NAMES}
    for i, (name, prepare_log) in enumerate(logs.items()):
        prepare_log.append([prepared(f"tx-{i}", name)])
    for i, name in enumerate(NAMES):
        reopened = PrepareLog(url, name)
        assert [(r.tx_id, r.participant) for r in reopened.unfinished_branches()] == [
            (f"tx-{i}", name)
        ]
        assert reopened.history([f"tx-{j}" for j in range(len(NAMES))]).keys() == {f"tx-{i}"}


def _legacy_log(url: str) -> RecordLog:
    legacy = RecordLog(make_engine(url), legacy_table_name("bank-a"))
    records = [
        prepared("a-1", "bank-a"),
        prepared("u-1", "bank_a"),
        ManualAction(tx_id="a-1", action="abort", reason="by hand"),
        ManualAction(tx_id="u-1", action="abort", reason="by hand"),
    ]
    legacy.append([LogRow(r.tx_id, record_kind(r), encode(r)) for r in records])
    return legacy


def test_a_log_of_the_older_naming_gives_each_participant_its_own_records(
    tmp_path: Path,
) -> None:
    url = str(tmp_path / "old.log.db")
    _legacy_log(url)
    bank_a = PrepareLog(url, "bank-a")
    assert {
        tx: [type(r).__name__ for r in rs] for tx, rs in bank_a.history(["a-1", "u-1"]).items()
    } == {"a-1": ["BranchPrepared", "ManualAction"]}
    bank_u = PrepareLog(url, "bank_a")
    assert [r.tx_id for r in bank_u.unfinished_branches()] == ["u-1"]
    # taken once: reopening does not copy again
    assert PrepareLog(url, "bank-a").log.count() == 2


def test_operators_read_a_log_of_the_older_naming_before_the_service_upgraded(
    tmp_path: Path,
) -> None:
    url = str(tmp_path / "old.log.db")
    _legacy_log(url)
    reader = PrepareLog(url, "bank-a", must_exist=True)
    assert reader.log.table.name == legacy_table_name("bank-a")


def test_operators_still_get_an_error_for_a_missing_log(tmp_path: Path) -> None:
    from runtime.errors import LogMissing

    with pytest.raises(LogMissing):
        PrepareLog(str(tmp_path / "nowhere.db"), "bank-a", must_exist=True)
