"""Outages outside the batch driver (issue 12): the log's append retry, what counts as a lost
database connection in a resource, configuration problems told from outages, the limits from the
environment, heartbeats reconnecting with back-off, one redaction helper."""

from __future__ import annotations

import ast
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import errors as pg_errors

from participant import resources
from participant.operations import OperationSpec, Refuse
from participant.reservation import ReservationResource
from participant.resources import connection_lost
from runtime import config, outages, store
from runtime.errors import (
    BrokerUnavailable,
    ConfigurationError,
    ConnectionLost,
    ResourceError,
    ResourceUnavailable,
)
from runtime.heartbeat import HeartbeatSender
from runtime.store import LogRow, RecordLog, configuration_problem
from schemas.validation import DEFAULT_LIMITS, Limits


def disconnect(message: str = "server closed the connection unexpectedly") -> Exception:
    """What SQLAlchemy raises when the server went away under a statement."""
    return sa.exc.OperationalError(
        "INSERT ...", {}, psycopg.OperationalError(message), connection_invalidated=True
    )


# ---- the log's append ------------------------------------------------------------------------


@pytest.fixture
def record_log(tmp_path: Path) -> RecordLog:
    return RecordLog(store.make_engine(str(tmp_path / "log.db")), "records")


def test_append_retries_an_outage_on_a_fresh_connection(
    record_log: RecordLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, failures = record_log._append_once, [disconnect(), disconnect()]

    def flaky(params: list[dict[str, Any]]) -> None:
        if failures:
            raise failures.pop()
        real(params)

    monkeypatch.setattr(record_log, "_append_once", flaky)
    record_log.append([LogRow("tx-1", "prepared", b"{}")])
    assert [r.tx_id for r in record_log.rows_for(["tx-1"])["tx-1"]] == ["tx-1"]


def test_append_gives_a_long_outage_back_to_the_driver(
    record_log: RecordLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []

    def down(params: list[dict[str, Any]]) -> None:
        calls.append(time.monotonic())
        raise disconnect()

    monkeypatch.setattr(record_log, "_append_once", down)
    with pytest.raises(sa.exc.OperationalError) as info:
        record_log.append([LogRow("tx-1", "prepared", b"{}")])
    assert outages.is_outage(info.value)
    assert len(calls) == 3
    assert calls[1] - calls[0] >= outages.INITIAL_WAIT_S * 0.9  # backed off, not at once


def test_append_does_not_retry_what_is_no_outage(
    record_log: RecordLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def broken(params: list[dict[str, Any]]) -> None:
        calls.append(1)
        raise sa.exc.IntegrityError("INSERT ...", {}, Exception("constraint"))

    monkeypatch.setattr(record_log, "_append_once", broken)
    with pytest.raises(sa.exc.IntegrityError):
        record_log.append([LogRow("tx-1", "prepared", b"{}")])
    assert calls == [1]


# ---- configuration problems and outages --------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "problem"),
    [
        (
            psycopg.OperationalError(
                'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
                'FATAL:  database "nope" does not exist'
            ),
            'database "nope" does not exist',
        ),
        (
            psycopg.OperationalError('connection failed: FATAL:  role "bob" does not exist'),
            'role "bob" does not exist',
        ),
        (
            psycopg.OperationalError('FATAL:  password authentication failed for user "postgres"'),
            'password authentication failed for user "postgres"',
        ),
        (
            psycopg.ProgrammingError('invalid connection option "foo"'),
            'invalid connection option "foo"',
        ),
        (
            psycopg.OperationalError(
                'connection failed: connection to server at "127.0.0.1", port 1 failed: '
                "Connection refused\n\tIs the server running on that host?"
            ),
            None,
        ),
        (psycopg.OperationalError("FATAL:  the database system is starting up"), None),
        (ConnectionRefusedError(111, "Connection refused"), None),
    ],
)
def test_configuration_problems_are_told_from_outages(
    error: Exception, problem: str | None
) -> None:
    wrapped = ConfigurationError("cannot connect to database postgresql://...")
    wrapped.__cause__ = error
    assert configuration_problem(wrapped) == problem


def test_a_configuration_problem_by_sqlstate() -> None:
    error = pg_errors.InvalidCatalogName("database gone")
    assert configuration_problem(error) is not None


def test_check_connection_keeps_the_outage_behind_its_one_line() -> None:
    engine = store.make_engine("postgresql://alice:s3cret@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(ConfigurationError) as info:
            store.check_connection(engine)
    finally:
        engine.dispose()
    assert outages.is_outage(info.value)  # a server that is down is waited for
    assert configuration_problem(info.value) is None
    assert "s3cret" not in str(info.value) and "\n" not in str(info.value)


# ---- what a resource counts as a lost connection -----------------------------------------------


class _Conn:
    def __init__(self, broken: bool) -> None:
        self.broken = broken


@pytest.mark.parametrize(
    ("error", "conn", "lost"),
    [
        (
            psycopg.OperationalError("consuming input failed: server closed the connection"),
            None,
            True,
        ),
        (psycopg.InterfaceError("the connection is closed"), None, True),
        (
            pg_errors.AdminShutdown("terminating connection due to administrator command"),
            None,
            True,
        ),
        (pg_errors.CannotConnectNow("the database system is starting up"), None, True),
        (pg_errors.LockNotAvailable("lock timeout"), None, False),
        (pg_errors.QueryCanceled("statement timeout"), None, False),
        (pg_errors.UniqueViolation("duplicate key"), None, False),
        (psycopg.ProgrammingError("bad query"), None, False),
        (disconnect(), None, True),
        (ConnectionResetError(), None, True),
        (ValueError("a handler's bug"), None, False),
        (Refuse("insufficient funds"), _Conn(broken=True), True),
        (Refuse("insufficient funds"), _Conn(broken=False), False),
    ],
)
def test_connection_lost(error: Exception, conn: Any, lost: bool) -> None:
    assert connection_lost(error, conn) is lost
    wrapped = RuntimeError("a handler wrapped it")
    wrapped.__cause__ = error
    assert connection_lost(wrapped, conn) is lost


def test_resource_unavailable_is_an_outage_and_redacted() -> None:
    error = resources.unavailable(
        "postgresql://bank:s3cret@db:5432/bank", psycopg.OperationalError("gone")
    )
    assert isinstance(error, ResourceUnavailable)
    assert outages.is_outage(error)
    assert "s3cret" not in str(error) and "bank:***@db" in str(error)


def test_bad_urls_are_shown_without_their_password() -> None:
    with pytest.raises(ConfigurationError) as amqp:
        config.amqp_url("http://u:s3cret@h/")
    with pytest.raises(ConfigurationError) as database:
        store.database_url("mysql://u:s3cret@h/db")
    for error in (amqp.value, database.value):
        assert "s3cret" not in str(error) and "u:***@h" in str(error)


ROOT = Path(__file__).resolve().parents[2]


def product_nodes(*, but: str) -> Iterator[tuple[str, ast.AST]]:
    """("path:line", node) for every AST node of the product's modules, but the module ``but``
    (a path from the repository's root) and docstrings."""
    for package in ("schemas", "runtime", "coordinator", "participant", "twophase"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / but:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            docstrings = {
                id(node.body[0].value)
                for node in ast.walk(tree)
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
                and node.body
                and isinstance(node.body[0], ast.Expr)
                and isinstance(node.body[0].value, ast.Constant)
            }
            for node in ast.walk(tree):
                if id(node) not in docstrings:
                    yield f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}", node


def test_one_redaction_helper() -> None:
    """Secrets are hidden by runtime.redaction alone: no other module of the product masks them
    itself (writes ``***``, or has SQLAlchemy hide the password)."""
    own = []
    for where, node in product_nodes(but="runtime/redaction.py"):
        masks = isinstance(node, ast.Constant) and "***" in str(node.value)
        hides = isinstance(node, ast.keyword) and (
            node.arg == "hide_password"
            and not (isinstance(node.value, ast.Constant) and node.value.value is False)
        )
        if masks or hides:
            own.append(where)
    assert own == []
    assert store._redacted(sa.make_url("postgresql+psycopg://u:pw@h/db")) == (
        "postgresql+psycopg://u:***@h/db"
    )


def test_the_default_broker_url_is_spelled_once() -> None:
    """runtime.config holds the default AMQP URL; every process and the Client resolve theirs
    there (flag, then TWOPHASE_AMQP_URL, then the default)."""
    others = [
        where
        for where, node in product_nodes(but="runtime/config.py")
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith(("amqp://", "amqps://"))
    ]
    assert others == []


# ---- ReservationResource: an outage in a handler is no NO vote --------------------------------


@pytest.fixture
def reservation(tmp_path: Path) -> ReservationResource:
    resource = ReservationResource(str(tmp_path / "bank.db"))
    resource.bind("bank-a")
    return resource


def test_a_lost_database_in_a_handler_raises_instead_of_voting_no(
    reservation: ReservationResource,
) -> None:
    runs: list[str] = []

    def handler(db: sa.Connection, args: dict[str, Any]) -> None:
        runs.append(args["n"])
        raise disconnect()

    op = OperationSpec("debit", handler)
    with pytest.raises(ResourceUnavailable) as info:
        reservation.prepare_many([("tx-1", op, {"n": "1"}), ("tx-2", op, {"n": "2"})])
    assert outages.is_outage(info.value)
    assert runs == ["1"]  # not redone branch by branch: no attempt can do better now
    assert reservation.prepared() == set()


def test_a_refusal_is_still_a_no_vote(reservation: ReservationResource) -> None:
    def handler(db: sa.Connection, args: dict[str, Any]) -> None:
        raise Refuse("insufficient funds")

    refusals = reservation.prepare_many([("tx-1", OperationSpec("debit", handler), {})])
    assert [str(r) for r in refusals] == ["insufficient funds"]


def test_a_bad_reservation_url_is_one_line_and_redacted() -> None:
    with pytest.raises(ResourceError) as info:
        ReservationResource("nosuchdb://bank:s3cret@host/db")
    assert "s3cret" not in str(info.value) and "\n" not in str(info.value)
    assert info.value.__context__ is None  # not an outage by its context


# ---- limits from the environment ---------------------------------------------------------------


def test_limits_default_to_the_defaults() -> None:
    assert config.limits({}) == DEFAULT_LIMITS
    assert config.limits({"TWOPHASE_MAX_BRANCHES": " "}) == DEFAULT_LIMITS


def test_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "TWOPHASE_MAX_MESSAGE_BYTES": "65536",
        "TWOPHASE_MAX_BRANCHES": "8",
        "TWOPHASE_MAX_ARGS_BYTES": "512",
        "TWOPHASE_MAX_REASON_BYTES": "200",
        "TWOPHASE_MAX_TIMEOUT": "2.5",
        "TWOPHASE_MAX_TX_ID_LENGTH": "40",
    }
    for variable, value in values.items():
        monkeypatch.setenv(variable, value)
    assert config.limits() == Limits(
        max_message_bytes=65536,
        max_branches=8,
        max_args_bytes=512,
        max_reason_bytes=200,
        max_timeout_ms=2500,
        max_tx_id_length=40,
    )


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("TWOPHASE_MAX_BRANCHES", "many", "TWOPHASE_MAX_BRANCHES must be a whole number"),
        ("TWOPHASE_MAX_BRANCHES", "0", "TWOPHASE_MAX_BRANCHES must be at least 1"),
        ("TWOPHASE_MAX_MESSAGE_BYTES", "-5", "at least 1"),
        ("TWOPHASE_MAX_ARGS_BYTES", "1.5", "whole number"),
        ("TWOPHASE_MAX_TIMEOUT", "soon", "TWOPHASE_MAX_TIMEOUT must be a number of seconds"),
        ("TWOPHASE_MAX_TIMEOUT", "0.001", "at least 0.01"),
        ("TWOPHASE_MAX_TIMEOUT", "inf", "number of seconds"),
        ("TWOPHASE_MAX_TX_ID_LENGTH", "89", "TWOPHASE_MAX_TX_ID_LENGTH must be 1 to 88"),
        ("TWOPHASE_MAX_TX_ID_LENGTH", "0", "1 to 88"),
    ],
)
def test_bad_limits_are_one_line_configuration_errors(
    variable: str, value: str, words: str
) -> None:
    with pytest.raises(ConfigurationError, match=words) as info:
        config.limits({variable: value})
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is None


# ---- heartbeats --------------------------------------------------------------------------------


class _HeartbeatChannel:
    def __init__(self) -> None:
        self.published = 0
        self.fail = False

    def publish(self, *args: object, **kwargs: object) -> None:
        if self.fail:
            raise ConnectionLost("connection reset")
        self.published += 1

    def poll(self, timeout: float) -> list[object]:
        return []

    def close(self) -> None:
        pass


def test_heartbeats_reconnect_with_back_off_not_once_a_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="twophase")
    channel = _HeartbeatChannel()
    attempts: list[float] = []
    refusals = threading.Semaphore(0)

    def open_channel() -> _HeartbeatChannel:
        attempts.append(time.monotonic())
        if refusals.acquire(blocking=False):
            raise BrokerUnavailable("cannot reach RabbitMQ at amqp://guest:***@h/: refused")
        channel.fail = False
        return channel

    sender = HeartbeatSender("bank-a", 0.5, open_channel, time.monotonic)
    sender.start()
    try:
        deadline = time.monotonic() + 5
        while channel.published < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for _ in range(4):
            refusals.release()
        channel.fail = True
        deadline = time.monotonic() + 15
        while channel.published < 2:
            assert time.monotonic() < deadline, attempts
            time.sleep(0.01)
    finally:
        sender.stop()
    reconnects = attempts[1:]
    gaps = [b - a for a, b in itertools.pairwise(reconnects)]
    assert len(reconnects) == 5
    for i, gap in enumerate(gaps):  # doubling from 0.1 s up to the 0.5 s period, no further
        assert gap >= min(outages.INITIAL_WAIT_S * 2**i, 0.5) * 0.9, gaps
        assert gap <= 0.5 + outages.INITIAL_WAIT_S + 0.2, gaps
    lines = [r.getMessage() for r in caplog.records if r.name == "twophase.heartbeat"]
    assert len(lines) == 2, lines
    assert "connection to RabbitMQ lost (ConnectionLost: connection reset)" in lines[0]
    assert "sending again after" in lines[1]


def test_stopping_heartbeats_ends_the_wait_for_the_broker() -> None:
    def never() -> Any:
        raise BrokerUnavailable("down")

    sender = HeartbeatSender("bank-a", 1.0, never, time.monotonic)
    sender.start()
    time.sleep(0.5)
    started = time.monotonic()
    sender.stop()
    assert time.monotonic() - started < 1.0
    assert not sender._thread.is_alive()
