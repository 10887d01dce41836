"""``TWOPHASE_QUEUE_TYPE=quorum`` on the real RabbitMQ (a single node: quorum queues work there),
each test on a virtual host of its own (docs/architecture.md §11.1, "Queue types").

Every durable queue is a quorum queue (the clients' exclusive reply queues stay classic);
publisher confirms, manual acks, redelivery and the dead-letter path work as on classic queues:
real services commit transfers, a participant killed with SIGKILL mid-load recovers with the money
conserved, a poison message still ends in the dead-letter queue. A vhost whose queues are classic
is refused at start with one line (exit 2), as is an unknown queue type, and a second instance is
refused on quorum queues too (its lock is an exclusive classic queue of its own).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from coordinator.client import Client
from runtime.amqp import AmqpChannel, Delivery
from runtime.errors import ConfigurationError
from runtime.suspects import POISON_ATTEMPTS
from schemas import topology
from schemas.codec import encode
from schemas.messages import Begin, OutcomeKind
from tests.conftest import rabbitmqctl
from tests.integration.test_recovery import (
    BANKS,
    Cluster,
    apply,
    copy,
    decided_in_log,
    drive_load,
    transfer,
    wait_for,
)
from twophase.processes import ServiceGroup

pytestmark = pytest.mark.integration

QUORUM = {"TWOPHASE_QUEUE_TYPE": "quorum"}
POISON_PREFIX = "poison-"

POISON_HOOK = '''\
"""Written by tests/integration/test_quorum_queues.py: the coordinator's core raises on every
message of a transaction whose tx_id starts with TWOPHASE_TEST_POISON_PREFIX (a bug an input finds).
"""
import os

_prefix = os.environ.get("TWOPHASE_TEST_POISON_PREFIX", "")
if _prefix:
    from coordinator.core import CoordinatorCore

    _handle = CoordinatorCore.handle

    def _poisoned(self, event, now_ms):
        if str(getattr(getattr(event, "message", None), "tx_id", "")).startswith(_prefix):
            raise RuntimeError("a bug this input finds")
        return _handle(self, event, now_ms)

    CoordinatorCore.handle = _poisoned
'''


def vhost_of(amqp_url: str) -> str:
    return amqp_url.rsplit("/", 1)[1]


def queue_types(amqp_url: str) -> dict[str, str]:
    """name -> type of every queue of the vhost, as ``rabbitmqctl list_queues`` shows them."""
    out = rabbitmqctl(
        "list_queues", "-q", "-p", vhost_of(amqp_url), "--no-table-headers", "name", "type"
    )
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            found[parts[0]] = parts[1]
    return found


def take_dead_letters(amqp_url: str) -> dict[bytes, str]:
    """Every dead-lettered body with its x-twophase-error header (the queue is emptied)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    found: dict[bytes, str] = {}
    try:
        channel = connection.channel()
        while True:
            method, props, body = channel.basic_get(topology.DEAD_LETTER_QUEUE, auto_ack=True)
            if method is None:
                return found
            found[body] = str((props.headers or {}).get(topology.ERROR_HEADER, ""))
    finally:
        connection.close()


@pytest.fixture
def quorum(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process (its probes and clients) and the services it starts declare quorum queues."""
    monkeypatch.setenv("TWOPHASE_QUEUE_TYPE", "quorum")


@pytest.fixture
def cluster(quorum: None, amqp_url: str, pg_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """test_recovery's coordinator and bank-a/b/c, on quorum queues; the coordinator with the
    poison hook (it acts on poison-* transactions only)."""
    found = Cluster(amqp_url, pg_url, tmp_path)
    hook = tmp_path / "poison-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(POISON_HOOK)

    def start_coordinator(crash_after: str | None = None) -> None:
        assert crash_after is None, "no crash points here"
        found.services.start_coordinator(
            PYTHONPATH=str(hook), TWOPHASE_TEST_POISON_PREFIX=POISON_PREFIX
        )

    found.start_coordinator = start_coordinator  # type: ignore[method-assign]
    try:
        yield found
    finally:
        found.close()


# ---- the AMQP boundary itself -----------------------------------------------------------------


def poll_until(channel: AmqpChannel, count: int, timeout: float = 10.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += channel.poll(0.2)
    return got


def test_confirms_acks_redelivery_and_dead_letters_on_quorum_queues(
    quorum: None, amqp_url: str
) -> None:
    channel = AmqpChannel(amqp_url)
    try:
        assert channel.queue_type == "quorum"
        queue = topology.participant_queue("bank-a")
        channel.declare_queue(queue)
        reply = topology.client_queue("quorum-test")
        channel.declare_queue(reply, durable=False, exclusive=True)  # stays classic
        types = queue_types(amqp_url)
        assert types[queue] == "quorum"
        assert types[topology.DEAD_LETTER_QUEUE] == "quorum"
        assert types[reply] == "classic"

        for i in range(5):
            channel.publish(queue, f"m{i}".encode())
        channel.wait_for_confirms()  # publisher confirms from a quorum queue
        channel.consume(queue)
        first = poll_until(channel, 5)
        assert sorted(d.body for d in first) == [f"m{i}".encode() for i in range(5)]
        assert not any(d.redelivered for d in first)
        channel.ack(first[:2])  # manual acks: two gone, three left unacked

        channel.reconnect(attempts=5)  # the unacked come back, marked redelivered
        again = poll_until(channel, 3)
        assert sorted(d.body for d in again) == sorted(d.body for d in first[2:])
        assert all(d.redelivered for d in again)
        channel.ack(again[:2])
        channel.dead_letter(again[2], "invalid: a test's reason")
        wait_for(lambda: channel.queue_counts(queue) == (0, 1), what="the queue to empty")
        dead = channel.queue_counts(topology.DEAD_LETTER_QUEUE)
        assert dead is not None and dead[0] == 1
    finally:
        channel.close()
    assert take_dead_letters(amqp_url) == {again[2].body: "invalid: a test's reason"}


# ---- real services ----------------------------------------------------------------------------


def test_services_on_quorum_queues_commit_and_dead_letter_a_poison_message(
    cluster: Cluster,
) -> None:
    cluster.open_accounts()
    cluster.start_all()
    types = queue_types(cluster.amqp_url)
    durable = [topology.COORDINATOR_QUEUE, topology.DEAD_LETTER_QUEUE]
    durable += [topology.participant_queue(name) for name in BANKS]
    assert {name: types.get(name) for name in durable} == dict.fromkeys(durable, "quorum"), types

    expected = copy(cluster.initial)
    with Client(cluster.amqp_url) as client:
        replies = [
            n for n, t in queue_types(cluster.amqp_url).items() if n.startswith("twophase.client.")
        ]
        assert replies and all(queue_types(cluster.amqp_url)[n] == "classic" for n in replies)
        for i in range(5):
            branches = transfer(1 + i, account=i % 3)
            outcome = client.submit(branches, tx_id=f"quorum-{i}", timeout=10)
            assert outcome.outcome is OutcomeKind.COMMITTED, outcome
            apply(expected, branches)
        cluster.wait_balances(expected)

        # A message whose handling raises: retried, then dead-lettered as poison, as on
        # classic queues; each failure rebuilt the coordinator on a redelivered batch.
        poison = Begin(
            tx_id=f"{POISON_PREFIX}1",
            branches=tuple(transfer(5)),
            timeout_ms=30_000,
            reply_to=topology.client_queue("nobody"),
        )
        sender = AmqpChannel(cluster.amqp_url, connection_name="twophase-test-sender")
        try:
            sender.publish(topology.COORDINATOR_QUEUE, encode(poison))
            sender.wait_for_confirms()
            wait_for(
                lambda: (sender.queue_counts(topology.DEAD_LETTER_QUEUE) or (0, 0))[0] >= 1,
                timeout=60,
                what="the poison message in the dead-letter queue",
            )
        finally:
            sender.close()
        dead = take_dead_letters(cluster.amqp_url)
        assert list(dead) == [encode(poison)], dead
        assert dead[encode(poison)] == (
            f"poison: handling it raised {POISON_ATTEMPTS} times, last: "
            "RuntimeError: a bug this input finds"
        )

        branches = transfer(7)  # and the coordinator goes on
        outcome = client.submit(branches, tx_id="after-poison", timeout=10)
        assert outcome.outcome is OutcomeKind.COMMITTED, outcome
        apply(expected, branches)
    cluster.wait_balances(expected)
    wait_for(lambda: not cluster.in_doubt(), what="nothing in doubt")
    assert cluster.services.processes["coordinator"].poll() is None


LOAD_TRANSFERS = 90
LOAD_CONCURRENCY = 12
LOAD_ACCOUNTS = 30
LOAD_WAIT_S = 90.0


def test_a_participant_killed_mid_load_recovers_and_money_is_conserved(cluster: Cluster) -> None:
    cluster.open_accounts(LOAD_ACCOUNTS, 1_000)
    cluster.start_all()
    plan = {}
    for i in range(LOAD_TRANSFERS):
        payer, payee, fee = BANKS[i % 3 :] + BANKS[: i % 3]
        plan[f"load-{i:03d}"] = transfer(1 + i % 7, payer, payee, fee, account=i % LOAD_ACCOUNTS)
    with Client(cluster.amqp_url) as client:

        def kill_bank_b(in_flight: list[str]) -> None:
            assert len(in_flight) == LOAD_CONCURRENCY  # a full window in flight
            cluster.services.kill("bank-b", signal.SIGKILL)  # with PREPAREs unacked
            time.sleep(0.5)
            cluster.services.restart("bank-b")
            cluster.ready("bank-b")

        seen = drive_load(
            client, plan, kill_bank_b, concurrency=LOAD_CONCURRENCY, wait_s=LOAD_WAIT_S
        )
        for name, process in cluster.services.processes.items():
            assert process.poll() is None, f"{name} exited:\n{cluster.services.output(name)}"
        cluster.wait_until_settled()

        decided = decided_in_log(cluster, plan, seen, client)

    committed = {tx for tx, kind in decided.items() if kind is OutcomeKind.COMMITTED}
    print(f"the log says {Counter(k.value for k in decided.values())}")
    assert len(committed) > LOAD_TRANSFERS // 2, decided
    for name in BANKS:  # each bank applied its committed branches exactly once
        mine = {tx for tx in committed if any(b.participant == name for b in plan[tx])}
        assert cluster.committed_at(name) == mine, name
    expected = copy(cluster.initial)
    for tx in sorted(committed):
        apply(expected, plan[tx])
    cluster.wait_balances(expected)
    total = sum(sum(accounts.values()) for accounts in expected.values())
    assert total == sum(sum(accounts.values()) for accounts in cluster.initial.values())
    assert take_dead_letters(cluster.amqp_url) == {}  # nothing dead-lettered on the way


# ---- what cannot work ends the start with one line ---------------------------------------------


def start_and_wait(services: ServiceGroup, name: str, **env: str) -> tuple[int, list[str]]:
    """Start ``name`` (the coordinator or a bank), wait for it to end: its status and lines."""
    (services.workdir / f"{name}.out").unlink(missing_ok=True)  # appended to, start after start
    if name == "coordinator":
        process = services.start_coordinator(**env)
    else:
        db = str(services.workdir / f"{name}.db")
        process = services.start_bank(name, db, "reservation", **env)
    try:
        status = process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"{name} did not end:\n{services.output(name)}") from None
    lines = [line for line in services.output(name, 50).splitlines() if line.strip()]
    return status, lines


@pytest.fixture
def services(amqp_url: str, tmp_path: Path) -> Iterator[ServiceGroup]:
    group = ServiceGroup(amqp_url, tmp_path, extra_env={"TWOPHASE_METRICS_PORT": "0"})
    yield group
    group.stop_all()


@pytest.mark.parametrize("name", ["coordinator", "bank-a"])
def test_quorum_against_classic_queues_ends_with_one_line(
    services: ServiceGroup, amqp_url: str, name: str
) -> None:
    # the vhost as a classic deployment left it: its queues and the dead-letter queue
    queue = (
        topology.COORDINATOR_QUEUE if name == "coordinator" else topology.participant_queue(name)
    )
    classic = AmqpChannel(amqp_url, queue_type="classic")
    classic.declare_queue(queue)
    classic.close()

    status, lines = start_and_wait(services, name, **QUORUM)
    assert status == 2, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(
        f"twophase {'coordinator' if name == 'coordinator' else 'participant'}: error: "
    )
    assert "is a classic queue, but TWOPHASE_QUEUE_TYPE=quorum" in line, line
    assert "delete the twophase queues" in line and "new virtual host" in line, line
    assert queue_types(amqp_url)[queue] == "classic"  # untouched

    # its own queue alone classic (the dead-letter queue deleted and now quorum): the same
    rabbitmqctl("delete_queue", "-p", vhost_of(amqp_url), topology.DEAD_LETTER_QUEUE)
    status, lines = start_and_wait(services, name, **QUORUM)
    assert status == 2 and len(lines) == 1, lines
    assert f"queue {queue} is a classic queue, but TWOPHASE_QUEUE_TYPE=quorum" in lines[0]


def test_a_classic_process_against_quorum_queues_is_refused_in_one_line(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    AmqpChannel(amqp_url, queue_type="quorum").close()  # a quorum dead-letter queue
    monkeypatch.delenv("TWOPHASE_QUEUE_TYPE", raising=False)
    with pytest.raises(ConfigurationError) as refused:
        Client(amqp_url)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        f"queue {topology.DEAD_LETTER_QUEUE} is a quorum queue, but TWOPHASE_QUEUE_TYPE=classic"
    ), message
    assert message.endswith("or set TWOPHASE_QUEUE_TYPE=quorum"), message


def test_an_unknown_queue_type_ends_the_start_with_one_line(services: ServiceGroup) -> None:
    status, lines = start_and_wait(services, "coordinator", TWOPHASE_QUEUE_TYPE="mirrored")
    assert status == 2, lines
    assert lines == [
        "twophase coordinator: error: TWOPHASE_QUEUE_TYPE must be classic or quorum, got 'mirrored'"
    ]


def test_a_second_instance_is_refused_on_quorum_queues_too(
    quorum: None, services: ServiceGroup, amqp_url: str
) -> None:
    # RabbitMQ would accept a second exclusive consumer on a quorum queue: the lock is a queue of
    # its own (runtime/instances.py)
    services.start_coordinator()
    services.wait_ready([topology.COORDINATOR_QUEUE])
    argv, env = services.commands["coordinator"]
    second = services.start("coordinator-second", argv, env)
    status = second.wait(60)
    del services.processes["coordinator-second"]
    lines = [ln for ln in services.output("coordinator-second", 50).splitlines() if ln.strip()]
    assert status == 2, lines
    assert len(lines) == 1 and "coordinator is already running" in lines[0], lines
    probe = AmqpChannel(amqp_url, connection_name="twophase-test-probe")
    try:
        assert probe.queue_counts(topology.COORDINATOR_QUEUE) == (0, 1)
    finally:
        probe.close()
    assert services.processes["coordinator"].poll() is None
