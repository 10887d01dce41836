"""``twophase tx`` refuses what it cannot do safely, in one line on stderr with exit status 2:

* a log that does not exist (it is never created: a wrong ``--data-dir`` read as an empty log
  was a false all-clear),
* ``resolve`` while the broker cannot say whether the service concerned is running,
* ``resolve`` of a ``tx_id`` the coordinator's log has no record of, unless ``--force``.

Each test failed on the code before these refusals existed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import sqlalchemy as sa

from coordinator.log import TABLE, DecisionLog
from participant.log import PrepareLog, table_name
from runtime.amqp import AmqpChannel
from runtime.store import database_url
from schemas import topology
from schemas.records import ManualAction, TxAborted
from tests.unit.test_admin import (
    BANK,
    BANK_APP,
    NO_BROKER,
    SETTINGS,
    PreparedBank,
    begun,
    cli,
    records_of,
)

REFUSED = 2


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for variable in SETTINGS:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def decision_log(data_dir: Path) -> Iterator[DecisionLog]:
    log = DecisionLog(str(data_dir / "coordinator.log.db"))
    log.append([begun("tx-undecided", "bank-a", "bank-b")])
    yield log
    log.close()


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    return err


def tables(url: str) -> list[str]:
    engine = sa.create_engine(database_url(url))
    try:
        return sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


# ---- a missing log is an error, and is not created ----------------------------------------


@pytest.mark.parametrize("verb", [("list",), ("list", "--in-doubt"), ("show", "tx-1")])
@pytest.mark.parametrize("participant", [(), ("--participant", BANK)])
def test_reading_a_missing_sqlite_log_fails_and_creates_nothing(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    verb: tuple[str, ...],
    participant: tuple[str, ...],
) -> None:
    wrong = tmp_path / "no-such-dir"
    code, out, err = cli(capsys, "tx", *verb, *participant, "--data-dir", str(wrong))
    assert code == REFUSED and out == ""
    name = f"{participant[1]}.log.db" if participant else "coordinator.log.db"
    assert f"no log at {wrong / name}" in one_line(err)
    assert not wrong.exists()  # neither the directory nor the file
    # the default ./.twophase, from a directory where no service ever ran
    code, _, err = cli(capsys, "tx", *verb, *participant)
    assert code == REFUSED
    assert f"no log at {tmp_path / '.twophase' / name}" in one_line(err)
    assert not (tmp_path / ".twophase").exists()


def test_a_sqlite_file_without_the_log_table_is_missing_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--log-url at another database must not grow a log table there."""
    other = tmp_path / "bank.db"
    engine = sa.create_engine(database_url(str(other)))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE accounts (id TEXT PRIMARY KEY)"))
    engine.dispose()
    code, _, err = cli(capsys, "tx", "list", "--log-url", str(other))
    assert code == REFUSED
    assert f"table {TABLE} does not exist" in one_line(err) and str(other) in err
    assert tables(str(other)) == ["accounts"]


def test_resolve_against_a_missing_log_fails_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, amqp_url: str
) -> None:
    wrong = tmp_path / "no-such-dir"
    args = ("--reason", "stuck", "--data-dir", str(wrong), "--amqp-url", amqp_url)
    code, out, err = cli(capsys, "tx", "resolve", "tx-1", "--abort", *args)
    assert code == REFUSED and out == ""
    assert f"no log at {wrong / 'coordinator.log.db'}" in one_line(err)
    assert not wrong.exists()


def test_participant_resolve_against_a_missing_prepare_log_fails_and_creates_nothing(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    amqp_url: str,
) -> None:
    prepared = PreparedBank(tmp_path, data_dir)
    monkeypatch.setenv("TWOPHASE_PARTICIPANT_NAME", BANK)
    monkeypatch.setenv("TWOPHASE_BANK_DB", prepared.db)
    wrong = tmp_path / "no-such-dir"
    code, out, err = cli(
        capsys,
        "tx",
        "resolve",
        "tx-p",
        "--abort",
        "--reason",
        "stuck",
        "--participant",
        BANK,
        "--app",
        BANK_APP,
        "--data-dir",
        str(wrong),
        "--amqp-url",
        amqp_url,
    )
    assert code == REFUSED and out == ""
    assert f"no log at {wrong / f'{BANK}.log.db'}" in one_line(err)
    assert not wrong.exists()
    assert prepared.balance() == (100, 30)  # still held


def test_a_missing_postgresql_database_is_an_error_without_the_password(
    capsys: pytest.CaptureFixture[str], pg_server: str
) -> None:
    missing = urlsplit(pg_server)._replace(path="/twophase_no_such_database")
    url = with_password(urlunsplit(missing), "s3cret")
    code, _, err = cli(capsys, "tx", "list", "--log-url", url)
    assert code == REFUSED
    assert "twophase_no_such_database" in one_line(err) and "does not exist" in err
    assert "s3cret" not in err and "***" in err


@pytest.mark.parametrize("participant", [(), ("--participant", BANK)])
def test_a_missing_postgresql_table_is_an_error_and_is_not_created(
    capsys: pytest.CaptureFixture[str], pg_url: str, participant: tuple[str, ...]
) -> None:
    url = with_password(pg_url, "s3cret")
    code, _, err = cli(capsys, "tx", "show", "tx-1", *participant, "--log-url", url)
    assert code == REFUSED
    table = table_name(BANK) if participant else TABLE
    assert f"table {table} does not exist" in one_line(err)
    assert urlsplit(pg_url).path.lstrip("/") in err
    assert "s3cret" not in err
    assert tables(pg_url) == []


def test_services_still_create_their_logs(tmp_path: Path) -> None:
    from runtime.errors import LogMissing

    url = str(tmp_path / "new" / "coordinator.log.db")
    with pytest.raises(LogMissing):
        DecisionLog(url, must_exist=True)
    DecisionLog(url).close()  # what the coordinator does
    DecisionLog(url, must_exist=True).close()
    PrepareLog(url, BANK).close()
    PrepareLog(url, BANK, must_exist=True).close()


# ---- resolve refuses when the broker cannot tell whether the service runs -----------------


def test_coordinator_resolve_is_refused_when_the_broker_is_unreachable(
    decision_log: DecisionLog, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = records_of(decision_log, "tx-undecided")
    code, out, err = cli(
        capsys,
        "tx",
        "resolve",
        "tx-undecided",
        "--abort",
        "--reason",
        "the coordinator looks dead",
        "--data-dir",
        str(data_dir),
        "--amqp-url",
        NO_BROKER,
    )
    assert code == REFUSED and out == ""
    assert "cannot tell whether the coordinator is running" in one_line(err)
    assert "amqp://guest:***@127.0.0.1:1/" in err and "guest:guest" not in err
    assert records_of(decision_log, "tx-undecided") == before


def test_participant_resolve_is_refused_when_the_broker_is_unreachable(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prepared = PreparedBank(tmp_path, data_dir)
    monkeypatch.setenv("TWOPHASE_PARTICIPANT_NAME", BANK)
    monkeypatch.setenv("TWOPHASE_BANK_DB", prepared.db)
    code, out, err = cli(
        capsys,
        "tx",
        "resolve",
        "tx-p",
        "--abort",
        "--reason",
        "stuck",
        "--participant",
        BANK,
        "--app",
        BANK_APP,
        "--data-dir",
        str(data_dir),
        "--amqp-url",
        NO_BROKER,
    )
    assert code == REFUSED and out == ""
    assert f"cannot tell whether {BANK} is running" in one_line(err)
    assert prepared.balance() == (100, 30)
    assert len(prepared.records()) == 1  # the PREPARED record only


def test_coordinator_resolve_is_refused_while_the_coordinator_consumes(
    decision_log: DecisionLog, data_dir: Path, capsys: pytest.CaptureFixture[str], amqp_url: str
) -> None:
    coordinator = AmqpChannel(amqp_url, connection_name="test-coordinator")
    try:
        coordinator.declare_queue(topology.COORDINATOR_QUEUE)
        coordinator.consume(topology.COORDINATOR_QUEUE)
        code, _, err = cli(
            capsys,
            "tx",
            "resolve",
            "tx-undecided",
            "--abort",
            "--reason",
            "stuck",
            "--data-dir",
            str(data_dir),
            "--amqp-url",
            amqp_url,
        )
    finally:
        coordinator.close()
    assert code == REFUSED
    assert "the coordinator is running" in one_line(err)
    assert len(records_of(decision_log, "tx-undecided")) == 1


# ---- resolve refuses a tx_id the log never saw, unless forced -----------------------------


def test_resolving_an_unknown_tx_id_is_refused_unless_forced(
    decision_log: DecisionLog, data_dir: Path, capsys: pytest.CaptureFixture[str], amqp_url: str
) -> None:
    args = ("--reason", "typo?", "--data-dir", str(data_dir), "--amqp-url", amqp_url)
    code, out, err = cli(capsys, "tx", "resolve", "tx-typo", "--abort", *args)
    assert code == REFUSED and out == ""
    assert "tx-typo is unknown to the coordinator's log at " in one_line(err)
    assert str(data_dir / "coordinator.log.db") in err and "--force" in err
    assert records_of(decision_log, "tx-typo") == []
    # forced, it is resolved as before, and the record says it was forced
    code, out, err = cli(capsys, "tx", "resolve", "tx-typo", "--abort", "--force", *args)
    assert code == 0, err
    assert "tx-typo resolved ABORT" in out
    manual, aborted = records_of(decision_log, "tx-typo")
    assert isinstance(manual, ManualAction) and manual.action == "forced abort"
    assert isinstance(aborted, TxAborted) and aborted.manual_reason == "typo?"


def test_force_is_refused_with_participant(
    capsys: pytest.CaptureFixture[str], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A branch its log never prepared has nothing to commit or roll back: --force cannot help."""
    monkeypatch.setenv("TWOPHASE_PARTICIPANT_NAME", BANK)
    monkeypatch.setenv("TWOPHASE_BANK_DB", str(data_dir / "bank.db"))
    code, _, err = cli(
        capsys,
        "tx",
        "resolve",
        "tx-p",
        "--abort",
        "--force",
        "--reason",
        "r",
        "--participant",
        BANK,
        "--app",
        BANK_APP,
        "--amqp-url",
        NO_BROKER,
    )
    assert code == REFUSED
    assert "--force applies to the coordinator's log only" in one_line(err)
    assert not data_dir.exists()
