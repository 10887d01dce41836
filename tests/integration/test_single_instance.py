"""A second instance of a service is refused at start (docs/architecture.md §11.2): real
processes on the real RabbitMQ, each test on a virtual host of its own.

Two copies of one participant consuming its queue once left reservations prepared while the
transactions ended. The second copy now stops before it recovers or consumes anything: one line,
exit status 2, naming the first instance when they share the log database. The first goes on
serving, and once it is gone a new instance starts.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from coordinator.client import Client
from runtime import amqp, instances, outages, store
from runtime.amqp import AmqpChannel
from runtime.errors import InstanceRunning
from schemas import topology
from schemas.messages import OutcomeKind
from twophase import bank
from twophase.processes import ServiceGroup

pytestmark = pytest.mark.integration

BANK = "bank-a"
QUEUE = topology.participant_queue(BANK)


def consumers(amqp_url: str, queue: str) -> int:
    channel = AmqpChannel(amqp_url, connection_name="twophase-test-probe")
    try:
        counts = channel.queue_counts(queue)
    finally:
        channel.close()
    assert counts is not None
    return counts[1]


def second_copy(services: ServiceGroup, first: str, label: str) -> tuple[int, list[str]]:
    """Start ``first``'s command again as ``label``; its exit status and output lines."""
    argv, env = services.commands[first]
    process = services.start(label, argv, env)
    status = process.wait(60)
    del services.processes[label]  # gone, as it should be: wait_ready must not count it
    lines = [line for line in services.output(label, 50).splitlines() if line.strip()]
    return status, lines


def assert_refused_naming(status: int, lines: list[str], service: str, first_pid: int) -> None:
    assert status == 2, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert f"{service} is already running" in line, line
    assert f"last started on this log by {socket.gethostname()} pid {first_pid}," in line, line
    assert "is held by another connection; stop that instance first" in line, line


@pytest.fixture
def services(amqp_url: str, tmp_path: Path) -> Iterator[ServiceGroup]:
    group = ServiceGroup(amqp_url, tmp_path, extra_env={"TWOPHASE_METRICS_PORT": "0"})
    yield group
    group.stop_all()


def test_a_second_participant_of_the_same_name_is_refused(
    services: ServiceGroup, amqp_url: str, tmp_path: Path
) -> None:
    db = str(tmp_path / f"{BANK}.db")
    bank.open_accounts(db, BANK, [(f"{BANK}-0", 100)])
    first = services.start_bank(BANK, db, TWOPHASE_LOG_URL=db)
    services.wait_ready([QUEUE])

    status, lines = second_copy(services, BANK, f"{BANK}-second")
    assert_refused_naming(status, lines, f"participant {BANK}", first.pid)
    assert first.poll() is None and consumers(amqp_url, QUEUE) == 1

    # the first serves on, alone: a one-phase credit commits
    services.start_coordinator(TWOPHASE_LOG_URL=str(tmp_path / "coordinator.log.db"))
    services.wait_ready([topology.COORDINATOR_QUEUE])
    with Client(amqp_url) as client:
        outcome = client.submit([(BANK, "credit", {"account": f"{BANK}-0", "amount": 5})])
    assert outcome.outcome is OutcomeKind.COMMITTED, outcome
    deadline = time.monotonic() + 10
    while bank.totals(db, BANK) != (105, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bank.totals(db, BANK) == (105, 0)

    # once the first is gone, a new instance starts (the broker drops a killed consumer at once)
    services.kill(BANK, signal.SIGKILL)
    services.restart(BANK)
    services.wait_ready([QUEUE])


def test_a_second_coordinator_is_refused(
    services: ServiceGroup, amqp_url: str, tmp_path: Path
) -> None:
    first = services.start_coordinator(TWOPHASE_LOG_URL=str(tmp_path / "coordinator.log.db"))
    services.wait_ready([topology.COORDINATOR_QUEUE])
    status, lines = second_copy(services, "coordinator", "coordinator-second")
    assert_refused_naming(status, lines, "coordinator", first.pid)
    assert first.poll() is None and consumers(amqp_url, topology.COORDINATOR_QUEUE) == 1


def test_without_a_shared_log_the_line_names_the_queue(
    services: ServiceGroup, amqp_url: str, tmp_path: Path
) -> None:
    db = str(tmp_path / f"{BANK}.db")
    bank.open_accounts(db, BANK, [(f"{BANK}-0", 100)])
    services.start_bank(BANK, db, TWOPHASE_LOG_URL=db)
    services.wait_ready([QUEUE])
    argv, env = services.commands[BANK]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other_db = str(elsewhere / f"{BANK}.db")
    bank.open_accounts(other_db, BANK, [(f"{BANK}-0", 100)])
    services.commands["elsewhere"] = (
        argv,
        {**env, "TWOPHASE_BANK_DB": other_db, "TWOPHASE_LOG_URL": other_db},
    )
    status, lines = second_copy(services, "elsewhere", f"{BANK}-elsewhere")
    assert status == 2 and len(lines) == 1, lines
    lock = topology.lock_queue(QUEUE)
    assert f"participant {BANK} is already running: {lock} is held by another" in lines[0]
    assert bank.totals(other_db, BANK) == (100, 0)


def test_services_sharing_a_database_claim_their_names_at_the_same_moment(pg_url: str) -> None:
    """The demo and the bench start every service on one PostgreSQL log at once: the first
    claims race to create the table, and none may fail for it."""
    engine = store.make_engine(pg_url)
    barrier = threading.Barrier(6)
    failures: list[BaseException] = []

    def claim(service: str) -> None:
        barrier.wait()
        try:
            instances.claim(engine, service, instances.this_instance())
        except BaseException as exc:  # collected, asserted below
            failures.append(exc)

    threads = [threading.Thread(target=claim, args=(f"participant bank-{n}",)) for n in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert failures == []
        me = f"{socket.gethostname()} pid {os.getpid()},"
        for n in range(6):
            assert (instances.holder(engine, f"participant bank-{n}") or "").startswith(me)
    finally:
        engine.dispose()


# ---- the lock at the channel, across reconnects ----------------------------------------------


def test_a_lock_is_refused_to_another_connection_and_freed_with_its_holder(amqp_url: str) -> None:
    lock = topology.lock_queue(QUEUE)
    first = AmqpChannel(amqp_url, connection_name="twophase-test-first")
    second = AmqpChannel(amqp_url, connection_name="twophase-test-second")
    try:
        first.hold(lock)
        first.hold(lock)  # held already: nothing to do
        with pytest.raises(InstanceRunning, match=f"{lock} is held by another connection"):
            second.hold(lock)
        assert not outages.is_outage(InstanceRunning("x"))
        second.publish(QUEUE, b"still usable")  # the refusal closed a probe channel only
        first.close()
        second.hold(lock)
    finally:
        first.close()
        second.close()


@contextmanager
def cut_off_while_another_holds(amqp_url: str) -> Iterator[tuple[AmqpChannel, AmqpChannel]]:
    """(cut_off, other): ``cut_off`` held the lock until its connection was cut, and ``other``
    took the lock meanwhile."""
    lock = topology.lock_queue(QUEUE)
    cut_off = AmqpChannel(amqp_url, connection_name="twophase-test-cut-off")
    other = AmqpChannel(amqp_url, connection_name="twophase-test-other")
    try:
        cut_off.hold(lock)
        cut_off._close_connection()
        other.hold(lock)
        yield cut_off, other
    finally:
        cut_off.close()
        other.close()


def test_a_reconnect_waits_for_its_lock_then_says_it_was_contested(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut off, this instance finds its lock held by another connection: it waits, takes it once
    free, and says so (the driver then rebuilds its state from the log)."""
    monkeypatch.setattr(amqp, "LOCK_WAIT_S", 20)
    with cut_off_while_another_holds(amqp_url) as (cut_off, other):
        threading.Timer(1.5, other.close).start()  # the other instance goes away
        started = time.monotonic()
        cut_off.reconnect()
        assert 1.0 < time.monotonic() - started < 15
        assert cut_off.take_lock_contested() is True
        assert cut_off.take_lock_contested() is False
        third = AmqpChannel(amqp_url, connection_name="twophase-test-third")
        try:
            with pytest.raises(InstanceRunning):  # and it holds the lock again
                third.hold(topology.lock_queue(QUEUE))
        finally:
            third.close()


def test_a_reconnect_that_cannot_take_its_lock_back_ends_the_instance(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(amqp, "LOCK_WAIT_S", 2)
    with (
        cut_off_while_another_holds(amqp_url) as (cut_off, _other),
        pytest.raises(InstanceRunning, match="another instance took over"),
    ):
        cut_off.reconnect()
