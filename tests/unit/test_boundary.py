"""No input message stops a service: the inputs that crash-looped or wedged a service before the
boundary checks, each fed to the real drivers on the in-memory broker beside a real transfer.

Each case publishes one hostile message, then a real transfer, and steps every driver the way its
service loop does (``step``: failures are handled, never raised). The transfer must commit, the
hostile message must be in the dead-letter queue with its reason, and no driver may have had to
rebuild its state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from coordinator.core import CoordinatorCore
from coordinator.service import CoordinatorConfig, CoordinatorService
from runtime import outages
from runtime.memory import MemoryBroker
from runtime.suspects import POISON_ATTEMPTS
from schemas import topology
from schemas.codec import encode
from schemas.messages import (
    Abort,
    Begin,
    Branch,
    Heartbeat,
    Inquire,
    OutcomeKind,
    Prepare,
    StatusQuery,
    Vote,
    VoteKind,
)
from schemas.topology import DEAD_LETTER_QUEUE, ERROR_HEADER
from schemas.validation import Limits
from tests.unit.test_drivers import REPLY, System, transfer

NOW_MS = 1_700_000_000_000
BAD_NAME = "no such/name"
COORDINATOR = topology.COORDINATOR_QUEUE
BANK_A = topology.participant_queue("bank-a")


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    system = System(tmp_path, MemoryBroker())
    yield system
    for driver in system.drivers():
        driver.channel.close()


def settle(system: System, turns: int = 30) -> None:
    for _ in range(turns):
        for driver in system.drivers():
            driver.step()


def dead_letters(system: System) -> list[tuple[bytes, str]]:
    with system.broker.lock:
        queue = system.broker.queues[DEAD_LETTER_QUEUE]
        return [(m.body, m.headers.get(ERROR_HEADER, "")) for m in queue]


def prepare(**changes: Any) -> Prepare:
    fields: dict[str, Any] = {
        "tx_id": "p-1",
        "participant": "bank-a",
        "operation": "credit",
        "args": {"account": "bank-a-0", "amount": 1},
        "deadline_ms": 0,  # set per case: the drivers read the real clock
        "participants": ("bank-a",),
    }
    return Prepare(**{**fields, **changes})


def _far_deadline() -> int:
    import time

    return time.time_ns() // 1_000_000 + 10_000


HOSTILE: dict[str, tuple[str, Any, str]] = {
    # id: (queue, message or raw bytes, the reason's category)
    "begin-empty-tx-id": (COORDINATOR, msgspec.structs.replace(transfer("x"), tx_id=""), "invalid"),
    "begin-201-char-tx-id": (COORDINATOR, transfer("t" * 201), "invalid"),
    "vote-invalid-participant": (
        COORDINATOR,
        Vote(tx_id="v-1", participant=BAD_NAME, vote=VoteKind.YES),
        "invalid",
    ),
    "inquire-invalid-participant": (
        COORDINATOR,
        Inquire(tx_id="i-1", participant=BAD_NAME),
        "invalid",
    ),
    "inquire-300-char-tx-id": (
        COORDINATOR,
        Inquire(tx_id="i" * 300, participant="bank-a"),
        "invalid",
    ),
    "vote-300-char-tx-id": (
        COORDINATOR,
        Vote(tx_id="v" * 300, participant="bank-a", vote=VoteKind.NO),
        "invalid",
    ),
    "abort-empty-tx-id": (BANK_A, Abort(tx_id="", participant="bank-a"), "invalid"),
    "abort-invalid-tx-id": (BANK_A, Abort(tx_id="no such/tx", participant="bank-a"), "invalid"),
    "prepare-201-char-tx-id": (BANK_A, "prepare:" + "p" * 201, "invalid"),
    "begin-300-char-reply-to": (
        COORDINATOR,
        msgspec.structs.replace(transfer("r-1"), reply_to=REPLY + "r" * 300),
        "invalid",
    ),
    "status-300-char-reply-to": (
        COORDINATOR,
        StatusQuery(tx_id="s-1", reply_to="q" * 300),
        "invalid",
    ),
    "prepare-deadline-2-62": (BANK_A, "prepare-deadline:" + str(2**62), "invalid"),
    "heartbeat-huge-interval": (
        COORDINATOR,
        Heartbeat(participant="bank-c", sent_at_ms=NOW_MS, interval_ms=10**9),
        "invalid",
    ),
    "begin-10-mb-args": (
        COORDINATOR,
        Begin(
            tx_id="big",
            branches=(Branch("bank-a", "credit", {"blob": "x" * 10_000_000}),),
            timeout_ms=1_000,
            reply_to=REPLY,
        ),
        "oversized",
    ),
    "begin-too-many-branches": (
        COORDINATOR,
        Begin(
            tx_id="wide",
            branches=tuple(Branch(f"p{i}", "credit") for i in range(65)),
            timeout_ms=1_000,
            reply_to=REPLY,
        ),
        "invalid",
    ),
    "prepare-on-the-coordinator-queue": (COORDINATOR, "prepare-here", "invalid"),
    "not-json": (COORDINATOR, b"\xff{not json", "undecodable"),
}


def _body(spec: Any) -> bytes:
    if isinstance(spec, bytes):
        return spec
    if isinstance(spec, str):  # built now: the drivers compare deadlines with the real clock
        kind, _, value = spec.partition(":")
        if kind == "prepare":
            return encode(prepare(tx_id=value, deadline_ms=_far_deadline()))
        if kind == "prepare-deadline":
            return encode(prepare(deadline_ms=int(value)))
        return encode(prepare(deadline_ms=_far_deadline()))
    return encode(spec)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_message_is_dead_lettered_and_the_service_goes_on(
    system: System, case: str
) -> None:
    queue, spec, category = HOSTILE[case]
    body = _body(spec)
    system.client.publish(queue, body)
    system.client.publish(COORDINATOR, encode(transfer("after")))
    settle(system)
    assert [(o.tx_id, o.outcome) for o in system.outcomes()] == [("after", OutcomeKind.COMMITTED)]
    [(dead_body, reason)] = dead_letters(system)
    assert dead_body == body
    assert reason.startswith(f"{category}: "), reason
    assert all(d.stats.restarts == 0 for d in system.drivers())


def test_a_long_reason_is_cut_before_it_reaches_a_durable_tombstone(system: System) -> None:
    # An Abort for a tx_id the participant never saw leaves a tombstone (presumed abort).
    reason = "r" * 100_000
    system.client.publish(
        BANK_A, encode(Abort(tx_id="forged", participant="bank-a", reason=reason))
    )
    settle(system, 3)
    worker = system.workers["bank-a"]
    records = worker.prepare_log.history(["forged"]).get("forged", [])
    assert records, "the forged Abort left no tombstone: this test would prove nothing"
    limit = Limits().max_reason_bytes
    assert all(len(getattr(r, "reason", "").encode()) <= limit for r in records)


def test_a_message_the_core_cannot_handle_is_retried_then_dead_lettered_as_poison(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_handle = CoordinatorCore.handle

    def handle(self: CoordinatorCore, event: Any, now_ms: int) -> Any:
        if getattr(getattr(event, "message", None), "tx_id", "") == "poison":
            raise RuntimeError("a bug this input finds")
        return real_handle(self, event, now_ms)

    monkeypatch.setattr(CoordinatorCore, "handle", handle)
    system.client.publish(COORDINATOR, encode(transfer("poison")))
    system.client.publish(COORDINATOR, encode(transfer("innocent")))
    settle(system)
    # Each failure rebuilds the coordinator from its log as a restart would, and a restart
    # aborts what was begun and not decided: "innocent" has its one outcome, either way.
    assert [o.tx_id for o in system.outcomes()] == ["innocent"]
    [(body, reason)] = dead_letters(system)
    assert body == encode(transfer("poison"))
    assert reason == (
        f"poison: handling it raised {POISON_ATTEMPTS} times, last: "
        "RuntimeError: a bug this input finds"
    )
    system.client.publish(COORDINATOR, encode(transfer("after")))
    settle(system)
    assert [(o.tx_id, o.outcome) for o in system.outcomes()] == [("after", OutcomeKind.COMMITTED)]
    assert system.coordinator.stats.restarts == POISON_ATTEMPTS


def test_an_outage_of_the_log_is_waited_out_and_the_state_rebuilt(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outages, "INITIAL_WAIT_S", 0.01)
    coordinator = system.coordinator
    log_table = coordinator.decision_log.log
    real_append, real_probe = log_table.append, log_table.probe
    failures = {"append": 2, "probe": 2}

    def down() -> sa.exc.OperationalError:
        return sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection"))

    def append(rows: Any) -> None:
        if failures["append"]:
            failures["append"] -= 1
            raise down()
        real_append(rows)

    def probe() -> None:
        if failures["probe"]:
            failures["probe"] -= 1
            raise down()
        real_probe()

    monkeypatch.setattr(log_table, "append", append)
    monkeypatch.setattr(log_table, "probe", probe)
    # the watch was given the bound method at start: the service's probe is the one it calls
    coordinator.watch.dependencies[0] = outages.Dependency("log", "sqlite:///x", probe)
    system.client.publish(COORDINATOR, encode(transfer("through-an-outage")))
    settle(system)
    assert [(o.tx_id, o.outcome) for o in system.outcomes()] == [
        ("through-an-outage", OutcomeKind.COMMITTED)
    ]
    assert coordinator.stats.restarts == 2
    assert failures == {"append": 0, "probe": 0}
    assert coordinator.watch.down == []
    assert dead_letters(system) == []


def test_heartbeats_with_made_up_names_add_no_metric_series(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    broker = MemoryBroker()
    coordinator = CoordinatorService.connect(
        CoordinatorConfig(
            "amqp://memory/",
            str(tmp_path / "c.db"),
            channel_factory=broker.channel,
            metrics_registry=registry,
        )
    )
    coordinator.channel.consume(coordinator.queue)
    client = broker.channel()
    now = _far_deadline()
    for i in range(50):
        beat = Heartbeat(participant=f"made-up-{i}", sent_at_ms=now, interval_ms=1_000)
        client.publish(COORDINATOR, encode(beat))
    for _ in range(3):
        coordinator.step()
    coordinator._refresh_metrics(now)
    series = [
        s.labels
        for m in registry.collect()
        for s in m.samples
        if m.name == "twophase_participant_up"
    ]
    assert len(coordinator.core.liveness) == 50, "the heartbeats did not arrive"
    assert series == []
    coordinator.channel.close()


def test_the_liveness_table_is_bounded() -> None:
    from coordinator.core import CoordinatorSettings

    core = CoordinatorCore(CoordinatorSettings(max_tracked_participants=10))
    from schemas.effects import Incoming

    for i in range(10):
        core.handle(Incoming(Heartbeat(participant=f"p{i}", sent_at_ms=0, interval_ms=100)), 0)
    core.handle(Incoming(Heartbeat(participant="late", sent_at_ms=0, interval_ms=100)), 1)
    assert "late" not in core.liveness  # the others are alive: nobody is forgotten
    core.handle(Incoming(Heartbeat(participant="p0", sent_at_ms=0, interval_ms=100)), 60_000)
    core.handle(Incoming(Heartbeat(participant="late", sent_at_ms=0, interval_ms=100)), 60_000)
    assert set(core.liveness) == {"p0", "late"}  # the silent ones made room
