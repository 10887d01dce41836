"""Operator tools on the logs: ``coordinator.admin``, ``participant.admin`` and
``twophase tx list | show | resolve`` (exit status 0 done, 1 no record, 2 refused as a usage or
safety error, 3 heuristic hazard).

The logs are SQLite files in ``tmp_path``. ``resolve`` asks the broker whether the service is
running and refuses when it cannot tell, so the CLI's resolutions get a fresh virtual host on the
real broker (``amqp_url``), where no service consumes; refusals that come before that check are
pointed at a port where no broker listens. Missing logs, an unreachable broker and unknown tx ids
are in test_admin_refusals.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import sqlalchemy as sa

from coordinator import admin as coordinator_admin
from coordinator.log import DecisionLog
from participant import admin as participant_admin
from participant.log import PrepareLog
from participant.worker import Participant
from runtime.errors import CoordinatorRunning, HeuristicHazard
from runtime.store import database_url
from schemas.messages import Branch
from schemas.records import (
    BranchCompleted,
    BranchPrepared,
    CoordinatorRecord,
    Decision,
    ManualAction,
    ParticipantRecord,
    TxAborted,
    TxBegun,
    TxCommitting,
    TxEnded,
)
from twophase import bank
from twophase.cli import main

NO_BROKER = "amqp://guest:guest@127.0.0.1:1/"
HAZARD = 3
BANK = "bank-x"
BANK_APP = "twophase.bank:from_env"
SETTINGS = (
    "TWOPHASE_AMQP_URL",
    "TWOPHASE_DATA_DIR",
    "TWOPHASE_LOG_URL",
    "TWOPHASE_PARTICIPANT_NAME",
    "TWOPHASE_BANK_DB",
    "TWOPHASE_BANK_RESOURCE",
)


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No TWOPHASE_* setting leaks in, and a default ./.twophase would land in tmp_path."""
    for variable in SETTINGS:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def begun(tx_id: str, *participants: str) -> TxBegun:
    branches = tuple(Branch(p, "credit", {"account": f"{p}-0", "amount": 1}) for p in participants)
    return TxBegun(tx_id=tx_id, branches=branches, deadline_ms=1_000, reply_to="twophase.client.x")


# ---- the coordinator's log ----------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def decision_log(data_dir: Path) -> Iterator[DecisionLog]:
    """One transaction in each state the operator can meet."""
    log = DecisionLog(str(data_dir / "coordinator.log.db"))
    log.append(
        [
            begun("tx-committed", "bank-a", "bank-b"),
            TxCommitting(tx_id="tx-committed", participants=("bank-a", "bank-b")),
            TxEnded(tx_id="tx-committed"),
            begun("tx-committing", "bank-a", "bank-b"),
            TxCommitting(tx_id="tx-committing", participants=("bank-a", "bank-b")),
            begun("tx-aborted", "bank-a", "bank-b"),
            TxAborted(
                tx_id="tx-aborted",
                reason="bank-b voted NO: insufficient funds",
                at_fault="bank-b",
                participants=("bank-a", "bank-b"),
            ),
            begun("tx-undecided", "bank-a", "bank-b"),
        ]
    )
    yield log
    log.close()


def records_of(log: DecisionLog, tx_id: str) -> list[CoordinatorRecord]:
    return log.history([tx_id]).get(tx_id, [])


def test_list_summarizes_every_state_and_in_doubt_keeps_the_unfinished(
    decision_log: DecisionLog,
) -> None:
    found = {s.tx_id: s for s in coordinator_admin.list_transactions(decision_log)}
    assert {tx: s.state for tx, s in found.items()} == {
        "tx-committed": "committed",
        "tx-committing": "committing",
        "tx-aborted": "aborted",
        "tx-undecided": "undecided",
    }
    aborted = found["tx-aborted"]
    assert aborted.participants == ("bank-a", "bank-b")
    assert (aborted.reason, aborted.at_fault) == ("bank-b voted NO: insufficient funds", "bank-b")
    assert not any(s.manual for s in found.values())
    in_doubt = coordinator_admin.list_transactions(decision_log, in_doubt=True)
    assert sorted(s.tx_id for s in in_doubt) == ["tx-committing", "tx-undecided"]


def test_list_shows_one_phase_transactions_like_any_other(decision_log: DecisionLog) -> None:
    one_phase = msgspec.structs.replace(begun("tx-one-phase", "bank-a"), one_phase=True)
    decision_log.append([one_phase])
    found = {s.tx_id: s for s in coordinator_admin.list_transactions(decision_log)}
    assert found["tx-one-phase"].state == "undecided"
    assert found["tx-one-phase"].participants == ("bank-a",)


def test_cli_list_and_list_in_doubt(
    decision_log: DecisionLog, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, "tx", "list", "--data-dir", str(data_dir))
    assert code == 0
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()}
    assert rows == {
        "tx-committed": ["committed", "bank-a,bank-b"],
        "tx-committing": ["committing", "bank-a,bank-b"],
        "tx-aborted": ["aborted", "bank-a,bank-b", "bank-b voted NO: insufficient funds"],
        "tx-undecided": ["undecided", "bank-a,bank-b"],
    }
    code, out, _ = cli(capsys, "tx", "list", "--in-doubt", "--data-dir", str(data_dir))
    assert code == 0
    assert sorted(line.split("\t")[0] for line in out.splitlines()) == [
        "tx-committing",
        "tx-undecided",
    ]
    # --log-url names the same log directly
    log_url = str(data_dir / "coordinator.log.db")
    code, out, _ = cli(capsys, "tx", "list", "--in-doubt", "--log-url", log_url)
    assert code == 0 and len(out.splitlines()) == 2


def test_cli_show_prints_the_timeline_in_order(
    decision_log: DecisionLog, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, "tx", "show", "tx-committed", "--data-dir", str(data_dir))
    assert code == 0
    kinds = [line.split()[2] for line in out.splitlines()]
    assert kinds == ["begun", "committing", "ended"]
    assert '"tx_id":"tx-committed"' in out
    code, out, _ = cli(capsys, "tx", "show", "tx-nobody-knows", "--data-dir", str(data_dir))
    assert code == 1
    assert "no record (presumed abort" in out


def test_resolve_abort_of_an_undecided_transaction_records_who_why_and_the_abort(
    decision_log: DecisionLog,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    amqp_url: str,
) -> None:
    before = records_of(decision_log, "tx-undecided")
    code, out, err = cli(
        capsys,
        "tx",
        "resolve",
        "tx-undecided",
        "--abort",
        "--reason",
        "coordinator host lost; ticket 42",
        "--data-dir",
        str(data_dir),
        "--amqp-url",
        amqp_url,
    )
    assert code == 0, err
    assert "tx-undecided resolved ABORT" in out
    added = records_of(decision_log, "tx-undecided")[len(before) :]
    assert [type(r) for r in added] == [ManualAction, TxAborted]
    manual, aborted = added
    assert isinstance(manual, ManualAction) and isinstance(aborted, TxAborted)
    assert (manual.action, manual.reason, manual.hazard) == (
        "abort",
        "coordinator host lost; ticket 42",
        "",
    )
    assert manual.operator  # whoever ran it
    assert aborted.manual_reason == "coordinator host lost; ticket 42"
    assert aborted.reason == "resolved by hand: coordinator host lost; ticket 42"
    assert aborted.participants == ("bank-a", "bank-b")
    summary = coordinator_admin.summarize("tx-undecided", records_of(decision_log, "tx-undecided"))
    assert (summary.state, summary.manual, summary.in_doubt) == ("aborted", True, False)
    # now it is no longer in doubt
    code, out, _ = cli(capsys, "tx", "list", "--in-doubt", "--data-dir", str(data_dir))
    assert [line.split("\t")[0] for line in out.splitlines()] == ["tx-committing"]


@pytest.mark.parametrize(
    ("tx_id", "flag", "logged"),
    [
        ("tx-committing", "--abort", "COMMIT"),
        ("tx-committed", "--abort", "COMMIT"),
        ("tx-aborted", "--commit", "ABORT"),
    ],
)
def test_resolve_contradicting_the_logged_decision_is_a_recorded_hazard(
    decision_log: DecisionLog,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    amqp_url: str,
    tx_id: str,
    flag: str,
    logged: str,
) -> None:
    before = records_of(decision_log, tx_id)
    state_before = coordinator_admin.summarize(tx_id, before).state
    code, out, err = cli(
        capsys,
        "tx",
        "resolve",
        tx_id,
        flag,
        "--reason",
        "operator thinks otherwise",
        "--data-dir",
        str(data_dir),
        "--amqp-url",
        amqp_url,
    )
    assert code == HAZARD
    assert out == ""
    assert f"heuristic hazard: {tx_id} was decided {logged}" in err
    after = records_of(decision_log, tx_id)
    assert after[: len(before)] == before
    (manual,) = after[len(before) :]  # nothing but the refusal was written
    assert isinstance(manual, ManualAction)
    wanted = flag.removeprefix("--")
    assert manual.action == f"refused {wanted}"
    assert manual.reason == "operator thinks otherwise"
    assert manual.hazard == f"the coordinator's log says {logged}"
    assert coordinator_admin.summarize(tx_id, after).state == state_before


def test_resolve_commit_without_a_logged_decision_is_refused_and_changes_nothing(
    decision_log: DecisionLog,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    amqp_url: str,
) -> None:
    before = records_of(decision_log, "tx-undecided")
    code, out, err = cli(
        capsys,
        "tx",
        "resolve",
        "tx-undecided",
        "--commit",
        "--reason",
        "I am sure everyone voted yes",
        "--data-dir",
        str(data_dir),
        "--amqp-url",
        amqp_url,
    )
    assert code == HAZARD
    assert out == ""
    assert "cannot resolve tx-undecided as COMMIT" in err
    assert "--participant" in err  # says what to do instead
    assert records_of(decision_log, "tx-undecided") == before
    # a transaction the log has never seen is the same, once forced past the unknown-id check
    code, _, err = cli(
        capsys,
        "tx",
        "resolve",
        "tx-never-seen",
        "--commit",
        "--force",
        "--reason",
        "why not",
        "--data-dir",
        str(data_dir),
        "--amqp-url",
        amqp_url,
    )
    assert code == HAZARD
    assert records_of(decision_log, "tx-never-seen") == []


def test_resolve_abort_of_an_undecided_one_phase_transaction_is_refused(
    decision_log: DecisionLog,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    amqp_url: str,
) -> None:
    """Its only branch may have committed unheard: only the coordinator's question can tell."""
    one_phase = msgspec.structs.replace(begun("tx-one-phase", "bank-a"), one_phase=True)
    decision_log.append([one_phase])
    code, out, err = cli(
        capsys,
        "tx",
        "resolve",
        "tx-one-phase",
        "--abort",
        "--reason",
        "stuck",
        "--data-dir",
        str(data_dir),
        "--amqp-url",
        amqp_url,
    )
    assert code == HAZARD
    assert out == ""
    assert "ran in one phase" in err and "bank-a" in err and "Start the coordinator" in err
    assert records_of(decision_log, "tx-one-phase") == [one_phase]


def test_resolve_that_agrees_with_the_log_is_recorded_as_a_confirmation(
    decision_log: DecisionLog,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    amqp_url: str,
) -> None:
    code, out, _ = cli(
        capsys,
        "tx",
        "resolve",
        "tx-aborted",
        "--abort",
        "--reason",
        "double-checking",
        "--data-dir",
        str(data_dir),
        "--amqp-url",
        amqp_url,
    )
    assert code == 0
    assert "already decided ABORT; confirmation recorded" in out
    manual = records_of(decision_log, "tx-aborted")[-1]
    assert isinstance(manual, ManualAction)
    assert (manual.action, manual.hazard) == ("confirmed abort", "")
    aborts = [r for r in records_of(decision_log, "tx-aborted") if isinstance(r, TxAborted)]
    assert len(aborts) == 1  # the decision itself is not written again


def test_resolve_is_refused_while_the_coordinator_runs_and_without_a_reason(
    decision_log: DecisionLog, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = records_of(decision_log, "tx-undecided")
    with pytest.raises(CoordinatorRunning):
        coordinator_admin.resolve(
            decision_log, "tx-undecided", Decision.ABORT, "stuck", coordinator_running=True
        )
    with pytest.raises(ValueError, match="--reason is required"):
        coordinator_admin.resolve(
            decision_log, "tx-undecided", Decision.ABORT, "  ", coordinator_running=False
        )
    code, _, err = cli(
        capsys,
        "tx",
        "resolve",
        "tx-undecided",
        "--abort",
        "--reason",
        "",
        "--data-dir",
        str(data_dir),
        "--amqp-url",
        NO_BROKER,
    )
    assert code == 2
    assert "--reason is required" in err and "Traceback" not in err
    assert records_of(decision_log, "tx-undecided") == before


def test_resolve_records_the_given_operator(decision_log: DecisionLog) -> None:
    said = coordinator_admin.resolve(
        decision_log,
        "tx-undecided",
        Decision.ABORT,
        "stuck since the outage",
        coordinator_running=False,
        operator="alice",
    )
    assert said == "tx-undecided resolved ABORT; prepared participants learn it when they inquire"
    manual = next(
        r for r in records_of(decision_log, "tx-undecided") if isinstance(r, ManualAction)
    )
    assert manual.operator == "alice"


# ---- a participant's prepare log and heuristic decisions ----------------------------------


class PreparedBank:
    """bank-x on a SQLite reservation: tx-p holds 30 of x-0's 100 and is in doubt."""

    def __init__(self, tmp_path: Path, data_dir: Path) -> None:
        self.db = str(tmp_path / "bank-x.db")
        self.data_dir = data_dir
        self.log_url = str(data_dir / f"{BANK}.log.db")
        self.coordinator_log_url = str(data_dir / "coordinator.log.db")
        bank.open_accounts(self.db, BANK, [("x-0", 100), ("x-1", 100)])
        app = self.app()
        app.resource.bind(BANK)
        debit = app.registry.get("debit")
        assert debit is not None
        args = {"account": "x-0", "amount": 30}
        app.resource.prepare("tx-p", debit, args)
        app.resource.close()
        self.log = PrepareLog(self.log_url, BANK)
        self.log.append(
            [
                BranchPrepared(
                    tx_id="tx-p", participant=BANK, operation="debit", args=args, deadline_ms=1
                ),
                BranchPrepared(
                    tx_id="tx-done", participant=BANK, operation="credit", args={}, deadline_ms=1
                ),
                BranchCompleted(tx_id="tx-done", participant=BANK, decision=Decision.COMMIT),
            ]
        )

    def app(self) -> Participant:
        return bank.create_bank(BANK, self.db, log_url=self.log_url, amqp_url=NO_BROKER)

    def balance(self, account: str = "x-0") -> tuple[int, int]:
        engine = sa.create_engine(database_url(self.db))
        try:
            with engine.connect() as conn:
                row = conn.execute(
                    sa.text(f"SELECT balance, held FROM {bank.table_name(BANK)} WHERE id = :a"),
                    {"a": account},
                ).one()
        finally:
            engine.dispose()
        return int(row[0]), int(row[1])

    def reservation_state(self, tx_id: str) -> str | None:
        engine = sa.create_engine(database_url(self.db))
        try:
            with engine.connect() as conn:
                return conn.execute(
                    sa.text(
                        "SELECT state FROM twophase_reservation "
                        "WHERE participant = :p AND tx_id = :t"
                    ),
                    {"p": BANK, "t": tx_id},
                ).scalar()
        finally:
            engine.dispose()

    def records(self, tx_id: str = "tx-p") -> list[ParticipantRecord]:
        return self.log.history([tx_id]).get(tx_id, [])

    def coordinator_says(self, *records: CoordinatorRecord) -> None:
        log = DecisionLog(self.coordinator_log_url)
        log.append(list(records))
        log.close()


@pytest.fixture
def prepared(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> PreparedBank:
    found = PreparedBank(tmp_path, data_dir)
    # what `--app twophase.bank:from_env` reads; its log comes from --data-dir
    monkeypatch.setenv("TWOPHASE_PARTICIPANT_NAME", BANK)
    monkeypatch.setenv("TWOPHASE_BANK_DB", found.db)
    return found


def resolve_branch_cli(
    capsys: pytest.CaptureFixture[str],
    prepared: PreparedBank,
    amqp_url: str,
    flag: str,
    *extra: str,
) -> tuple[int, str, str]:
    return cli(
        capsys,
        "tx",
        "resolve",
        "tx-p",
        flag,
        "--participant",
        BANK,
        "--app",
        BANK_APP,
        "--reason",
        "coordinator unreachable for hours; ticket 7",
        "--data-dir",
        str(prepared.data_dir),
        "--amqp-url",
        amqp_url,
        *extra,
    )


def test_participant_list_and_show(
    prepared: PreparedBank, capsys: pytest.CaptureFixture[str]
) -> None:
    found = {b.tx_id: b for b in participant_admin.list_branches(prepared.log)}
    assert {tx: (b.state, b.operation) for tx, b in found.items()} == {
        "tx-p": ("in doubt", "debit"),
        "tx-done": ("committed", "credit"),
    }
    in_doubt = participant_admin.list_branches(prepared.log, in_doubt=True)
    assert [b.tx_id for b in in_doubt] == ["tx-p"]
    where = ("--participant", BANK, "--data-dir", str(prepared.data_dir))
    code, out, _ = cli(capsys, "tx", "list", "--in-doubt", *where)
    assert code == 0
    assert out.splitlines() == ["tx-p\tin doubt\tdebit"]
    code, out, _ = cli(capsys, "tx", "show", "tx-done", *where)
    assert code == 0
    assert [line.split()[2] for line in out.splitlines()] == ["prepared", "completed"]


def test_heuristic_commit_agreeing_with_the_coordinator_applies_the_hold(
    prepared: PreparedBank,
    capsys: pytest.CaptureFixture[str],
    amqp_url: str,
) -> None:
    prepared.coordinator_says(begun("tx-p", BANK), TxCommitting(tx_id="tx-p", participants=(BANK,)))
    assert prepared.balance() == (100, 30)
    code, out, err = resolve_branch_cli(capsys, prepared, amqp_url, "--commit")
    assert code == 0, err
    assert "tx-p at bank-x resolved COMMIT" in out and "hazard" not in out
    assert prepared.balance() == (70, 0)  # the hold was applied, exactly once
    assert prepared.reservation_state("tx-p") == "committed"
    added = prepared.records()[1:]
    assert [type(r) for r in added] == [ManualAction, BranchCompleted]
    manual, completed = added
    assert isinstance(manual, ManualAction) and isinstance(completed, BranchCompleted)
    assert (manual.action, manual.hazard) == ("commit", "")
    assert manual.reason == "coordinator unreachable for hours; ticket 7"
    assert completed.decision is Decision.COMMIT
    assert completed.reason == "resolved by hand: coordinator unreachable for hours; ticket 7"
    assert participant_admin.summarize("tx-p", prepared.records()).state == "committed"
    # it is no longer in doubt: resolving it again is refused as a usage error
    code, _, err = resolve_branch_cli(capsys, prepared, amqp_url, "--commit")
    assert code == 2
    assert "not in doubt at bank-x (it is committed)" in err and "Traceback" not in err
    assert prepared.balance() == (70, 0)


def test_heuristic_abort_with_no_coordinator_decision_releases_the_hold(
    prepared: PreparedBank,
    capsys: pytest.CaptureFixture[str],
    amqp_url: str,
) -> None:
    prepared.coordinator_says(begun("tx-p", BANK))  # begun, never decided: presumed abort
    code, out, err = resolve_branch_cli(capsys, prepared, amqp_url, "--abort")
    assert code == 0, err
    assert "resolved ABORT" in out
    assert prepared.balance() == (100, 0)
    assert prepared.reservation_state("tx-p") == "aborted"
    manual, completed = prepared.records()[1:]
    assert isinstance(manual, ManualAction) and manual.hazard == ""
    assert isinstance(completed, BranchCompleted) and completed.decision is Decision.ABORT


@pytest.mark.parametrize(
    ("coordinator", "flag", "said"),
    [
        ("abort", "--commit", "ABORT"),
        ("nothing", "--commit", "no decision (presumed abort)"),
        ("commit", "--abort", "COMMIT"),
    ],
)
def test_heuristic_decision_contradicting_the_coordinator_is_refused_and_recorded(
    prepared: PreparedBank,
    capsys: pytest.CaptureFixture[str],
    amqp_url: str,
    coordinator: str,
    flag: str,
    said: str,
) -> None:
    if coordinator == "abort":
        prepared.coordinator_says(
            begun("tx-p", BANK), TxAborted(tx_id="tx-p", reason="vote timeout")
        )
    elif coordinator == "commit":
        prepared.coordinator_says(
            begun("tx-p", BANK), TxCommitting(tx_id="tx-p", participants=(BANK,))
        )
    else:
        prepared.coordinator_says(begun("tx-other", BANK))  # a log that never saw tx-p
    code, out, err = resolve_branch_cli(capsys, prepared, amqp_url, flag)
    assert code == HAZARD
    assert out == ""
    assert f"heuristic hazard: the coordinator's log says {said} for tx-p" in err
    assert prepared.balance() == (100, 30)  # still held: nothing applied, nothing released
    assert prepared.reservation_state("tx-p") == "prepared"
    records = prepared.records()
    assert [type(r) for r in records] == [BranchPrepared, ManualAction]
    manual = records[1]
    assert isinstance(manual, ManualAction)
    assert manual.action == f"refused {flag.removeprefix('--')}"
    assert manual.hazard == f"the coordinator's log says {said}"
    assert participant_admin.summarize("tx-p", records).state == "in doubt"


def test_heuristic_decision_with_an_unreadable_coordinator_log_is_allowed_with_a_hazard(
    prepared: PreparedBank, capsys: pytest.CaptureFixture[str], amqp_url: str, tmp_path: Path
) -> None:
    garbage = tmp_path / "coordinator-garbage.db"
    garbage.write_bytes(b"this is not a database " * 64)
    code, out, err = resolve_branch_cli(
        capsys, prepared, amqp_url, "--commit", "--coordinator-log", str(garbage)
    )
    assert code == 0, err
    assert "resolved COMMIT (hazard recorded: the coordinator's decision could not be checked)" in (
        out
    )
    assert prepared.balance() == (70, 0)
    manual, completed = prepared.records()[1:]
    assert isinstance(manual, ManualAction)
    assert manual.hazard == "the coordinator's decision could not be checked"
    assert isinstance(completed, BranchCompleted) and completed.decision is Decision.COMMIT


def test_a_missing_coordinator_log_is_unknown_not_presumed_abort(
    prepared: PreparedBank,
    capsys: pytest.CaptureFixture[str],
    amqp_url: str,
) -> None:
    """An absent log says nothing: the abort is allowed, but only with a hazard recorded."""
    missing = Path(prepared.coordinator_log_url)
    assert not missing.exists()
    code, out, err = resolve_branch_cli(capsys, prepared, amqp_url, "--abort")
    assert code == 0, err
    assert "hazard recorded: the coordinator's decision could not be checked" in out
    assert not missing.exists()  # not created (an empty log would "say" presumed abort)
    assert prepared.balance() == (100, 0)
    manual = prepared.records()[1]
    assert isinstance(manual, ManualAction)
    assert manual.hazard == "the coordinator's decision could not be checked"


def test_participant_resolve_refusals_are_usage_errors(
    prepared: PreparedBank,
    capsys: pytest.CaptureFixture[str],
    amqp_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = ("tx", "resolve", "tx-p", "--commit", "--reason", "r", "--participant", BANK)
    common = ("--data-dir", str(prepared.data_dir), "--amqp-url", amqp_url)
    code, _, err = cli(capsys, *base, *common)
    assert code == 2 and "--participant needs --app" in err
    monkeypatch.setenv("TWOPHASE_PARTICIPANT_NAME", "bank-y")
    code, _, err = cli(capsys, *base, "--app", BANK_APP, *common)
    assert code == 2 and "--app gives participant 'bank-y', not 'bank-x'" in err
    monkeypatch.setenv("TWOPHASE_PARTICIPANT_NAME", BANK)
    code, _, err = cli(capsys, *base[:2], "tx-unknown", *base[3:], "--app", BANK_APP, *common)
    assert code == 2 and "tx-unknown is not in doubt at bank-x (it is unknown)" in err
    assert prepared.balance() == (100, 30)
    assert [type(r) for r in prepared.records()] == [BranchPrepared]
    assert not (Path.cwd() / ".twophase").exists()  # --data-dir was honoured throughout


def test_resolve_branch_directly(prepared: PreparedBank) -> None:
    app = prepared.app()
    with pytest.raises(ValueError, match="--reason is required"):
        participant_admin.resolve_branch(app, "tx-p", Decision.COMMIT, "", coordinator=None)
    with pytest.raises(HeuristicHazard):
        participant_admin.resolve_branch(
            app, "tx-p", Decision.COMMIT, "sure", coordinator=Decision.ABORT, operator="bob"
        )
    said = participant_admin.resolve_branch(
        prepared.app(), "tx-p", Decision.COMMIT, "sure", coordinator="unknown", operator="bob"
    )
    assert said == (
        "tx-p at bank-x resolved COMMIT "
        "(hazard recorded: the coordinator's decision could not be checked)"
    )
    refused, manual, completed = prepared.records()[1:]
    assert isinstance(refused, ManualAction) and refused.operator == "bob"
    assert refused.hazard == "the coordinator's log says ABORT"
    assert isinstance(manual, ManualAction) and manual.action == "commit"
    assert isinstance(completed, BranchCompleted)
    assert prepared.balance() == (70, 0)
