"""Tracing without a broker: the real drivers, client and cores on an in-memory AMQP double.

* tracing off (no OTEL endpoint) creates no span and parses no trace context: the tracer, the
  propagator and the client's span helper are booby-trapped and a committed and an aborted
  transaction still go through;
* tracing on (an in-memory exporter) gives one trace per transaction with the span tree the
  integration test checks against real processes, and recovery spans link to the original trace.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coordinator.client import Client
from coordinator.service import CoordinatorConfig, CoordinatorService
from participant.worker import Participant, ParticipantWorker
from runtime import tracing
from runtime.amqp import Delivery
from runtime.errors import ConfigurationError
from schemas.messages import Branch, OutcomeKind
from twophase import bank

OTEL_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class Bus:
    """Queues of deliveries shared by the fake channels (thread-safe: the client has a thread)."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[Delivery]] = {}
        self.lock = threading.Lock()
        self.tags = itertools.count(1)

    def channel(self, *args: Any, **kwargs: Any) -> FakeChannel:
        return FakeChannel(self)

    def put(self, queue: str, body: bytes, headers: dict[str, str] | None) -> None:
        with self.lock:
            if queue in self.queues:  # unroutable messages are dropped
                tag = next(self.tags)
                self.queues[queue].append(
                    Delivery(body, dict(headers or {}), queue, queue, tag, 0, False)
                )


class FakeChannel:
    """What the drivers and the client use of ``AmqpChannel``."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.consuming: list[str] = []
        self.wake: list[Callable[[], None]] = []

    def declare_queue(self, name: str, **options: Any) -> None:
        with self.bus.lock:
            self.bus.queues.setdefault(name, deque())

    def hold(self, lock: str) -> None:
        pass

    def take_lock_contested(self) -> bool:
        return False

    def consume(self, queue: str) -> None:
        self.consuming.append(queue)

    def poll(self, timeout: float, max_messages: int = 10_000) -> list[Delivery]:
        deadline = time.monotonic() + min(timeout, 0.02)
        while True:
            with self.bus.lock:
                out: list[Delivery] = []
                for queue in self.consuming:
                    pending = self.bus.queues[queue]
                    while pending and len(out) < max_messages:
                        out.append(pending.popleft())
            if out or time.monotonic() >= deadline or self.wake:
                self.wake.clear()
                return out
            time.sleep(0.001)

    def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
        persistent: bool = True,
        mandatory: bool = True,
    ) -> None:
        self.bus.put(routing_key, body, headers)

    def wait_for_confirms(self, timeout: float = 30.0) -> None:
        pass

    def take_failures(self) -> list[str]:
        return []

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        pass

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        raise AssertionError(f"dead-lettered: {reason}")

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        self.wake.append(fn)

    def reconnect(self, attempts: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class World:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bus = Bus()
        for module in ("coordinator.service", "participant.worker", "coordinator.client"):
            monkeypatch.setattr(f"{module}.AmqpChannel", self.bus.channel)
        self.tmp = tmp_path
        self.coordinator = CoordinatorService.connect(
            CoordinatorConfig("amqp://fake/", str(tmp_path / "coordinator.log.db"))
        )
        self.banks: dict[str, Participant] = {}
        self.drivers: list[CoordinatorService | ParticipantWorker] = [self.coordinator]
        for name in ("bank-a", "bank-b", "bank-c"):
            db = str(tmp_path / f"{name}.db")
            bank.open_accounts(db, name, [(f"{name}-0", 100)])
            app = bank.create_bank(
                name, db, amqp_url="amqp://fake/", log_url=str(tmp_path / f"{name}.log.db")
            )
            self.add_participant(app)

    def add_participant(self, app: Participant) -> None:
        worker = ParticipantWorker.connect(app)
        app._worker = worker
        self.banks[app.name] = app
        self.drivers.append(worker)

    def heartbeats(self) -> None:
        """What the participants' heartbeat threads would have said (they run only in serve)."""
        from runtime.driver import now_ms
        from schemas.effects import Incoming
        from schemas.messages import Heartbeat

        for name in self.banks:
            beat = Heartbeat(participant=name, sent_at_ms=now_ms(), interval_ms=1000)
            self.coordinator.core.handle(Incoming(beat), now_ms())

    def start(self) -> None:
        for driver in self.drivers:
            if driver.queue not in driver.channel.consuming:  # type: ignore[attr-defined]
                driver.channel.consume(driver.queue)

    def run_until(self, done: Callable[[], bool], timeout: float = 20.0) -> None:
        """Turn the drivers one at a time until ``done()`` (checked after every turn)."""
        self.start()
        deadline = time.monotonic() + timeout
        for driver in itertools.cycle(self.drivers):
            if done():
                return
            if time.monotonic() > deadline:
                raise AssertionError("the in-memory world did not get there in time")
            driver.turn()

    def settle(self, seconds: float = 0.3) -> None:
        """Run every driver for a while (ACKs, END, forgetting)."""
        end = time.monotonic() + seconds
        self.run_until(lambda: time.monotonic() > end)


def transfer(amount: int) -> list[Branch]:
    return [
        Branch("bank-a", "debit", {"account": "bank-a-0", "amount": amount + 1}),
        Branch("bank-b", "credit", {"account": "bank-b-0", "amount": amount}),
        Branch("bank-c", "credit", {"account": "bank-c-0", "amount": 1}),
    ]


def run_two_transactions(world: World) -> tuple[Any, Any]:
    with Client("amqp://fake/") as client:
        committed = client.submit_future(transfer(10), tx_id="tx-commit", timeout=10)
        world.run_until(committed.done)
        aborted = client.submit_future(transfer(500), tx_id="tx-abort", timeout=10)
        world.run_until(aborted.done)
        world.settle()
    return committed.result(), aborted.result()


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in OTEL_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def test_tracing_off_creates_no_span_and_parses_no_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_otel_env: None
) -> None:
    from opentelemetry.sdk.trace import Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    assert not tracing.ENABLED

    def trap(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tracing work while tracing is off")

    monkeypatch.setattr(Tracer, "start_span", trap)
    monkeypatch.setattr(Tracer, "start_as_current_span", trap)
    monkeypatch.setattr(TraceContextTextMapPropagator, "extract", trap)
    for helper in ("tracer", "start_submit", "context_from", "traceparent_of", "link_to"):
        monkeypatch.setattr(tracing, helper, trap)
    monkeypatch.setattr("coordinator.service.CoordinatorTrace", trap)
    monkeypatch.setattr("participant.worker.ParticipantTrace", trap)

    world = World(tmp_path, monkeypatch)
    assert world.coordinator.trace is None and not world.coordinator.observing
    assert all(d.trace is None and not d.observing for d in world.drivers)
    committed, aborted = run_two_transactions(world)
    assert committed.outcome is OutcomeKind.COMMITTED
    assert aborted.outcome is OutcomeKind.ABORTED and aborted.at_fault == "bank-a"


@pytest.fixture
def exported(no_otel_env: None) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("unit-test", exporter=exporter, flush_on_sigterm=False)
    try:
        yield exporter
    finally:
        tracing.shutdown()
    assert not tracing.ENABLED


def _records(spans: Sequence[ReadableSpan]) -> list[tracing.SpanRecord]:
    records = []
    for span in spans:
        ctx = span.get_span_context()
        assert ctx is not None
        records.append(
            tracing.SpanRecord(
                trace_id=f"{ctx.trace_id:032x}",
                span_id=f"{ctx.span_id:016x}",
                parent_span_id=f"{span.parent.span_id:016x}" if span.parent else "",
                name=span.name,
                service=str(span.attributes.get("participant", "")) if span.attributes else "",
                attributes=dict(span.attributes or {}),
                error=span.status.status_code.name == "ERROR",
                start_ns=span.start_time or 0,
                end_ns=span.end_time or 0,
                links=tuple(f"{link.context.trace_id:032x}" for link in span.links),
            )
        )
    return records


def _children(spans: list[tracing.SpanRecord], parent: tracing.SpanRecord) -> list[Any]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


def test_one_trace_per_transaction_with_per_participant_spans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exported: InMemorySpanExporter
) -> None:
    world = World(tmp_path, monkeypatch)
    committed, aborted = run_two_transactions(world)
    assert committed.outcome is OutcomeKind.COMMITTED
    assert aborted.outcome is OutcomeKind.ABORTED
    world.run_until(lambda: world.coordinator.core.transactions == {})
    world.settle(0.1)
    # nothing is kept once the transactions are forgotten
    coordinator_trace = world.coordinator.trace
    assert coordinator_trace is not None and coordinator_trace.open_transactions == 0
    for app in world.banks.values():
        assert app.worker is not None and app.worker.trace is not None
        assert app.worker.trace.open_spans == 0
    tracing.force_flush()
    spans = _records(exported.get_finished_spans())
    by_tx: dict[str, list[tracing.SpanRecord]] = {}
    for span in spans:
        by_tx.setdefault(str(span.attributes.get("tx_id")), []).append(span)
    assert set(by_tx) == {"tx-commit", "tx-abort"}

    for tx_id, tx_spans in by_tx.items():
        print(f"\n{tx_id}:\n" + tracing.format_span_tree(tx_spans))
        assert len({s.trace_id for s in tx_spans}) == 1, f"{tx_id} spans more than one trace"
        (submit,) = [s for s in tx_spans if s.name == "submit"]
        assert submit.parent_span_id == ""
        (tx,) = _children(tx_spans, submit)
        assert tx.name == "tx"
        prepares = [s for s in _children(tx_spans, tx) if s.name == "prepare"]
        assert sorted(s.attributes["participant"] for s in prepares) == [
            "bank-a",
            "bank-b",
            "bank-c",
        ]
        for prepare in prepares:
            names = sorted(s.name for s in _children(tx_spans, prepare))
            operation = "debit" if prepare.attributes["participant"] == "bank-a" else "credit"
            assert f"handler {operation}" in names, (prepare, names)

    commit_tx = by_tx["tx-commit"]
    (tx,) = [s for s in commit_tx if s.name == "tx"]
    assert tx.attributes["outcome"] == "committed" and not tx.error
    for prepare in [s for s in _children(commit_tx, tx) if s.name == "prepare"]:
        assert prepare.attributes["vote"] == "yes"
        assert "prepare-log write" in {s.name for s in _children(commit_tx, prepare)}
    commits = [s for s in _children(commit_tx, tx) if s.name == "commit"]
    assert len(commits) == 3
    for commit in commits:
        assert commit.attributes.get("acked") is True
        (resource_commit,) = _children(commit_tx, commit)
        assert resource_commit.name == "commit"
        assert resource_commit.attributes["participant"] == commit.attributes["participant"]

    abort_tx = by_tx["tx-abort"]
    (tx,) = [s for s in abort_tx if s.name == "tx"]
    assert tx.error and tx.attributes["outcome"] == "aborted"
    assert tx.attributes["at_fault"] == "bank-a"
    (refused,) = [
        s
        for s in _children(abort_tx, tx)
        if s.name == "prepare" and s.attributes["participant"] == "bank-a"
    ]
    assert refused.error and refused.attributes["vote"] == "no"
    assert "insufficient funds" in str(refused.attributes["reason"])
    (handler,) = [s for s in _children(abort_tx, refused) if s.name == "handler debit"]
    assert handler.error and handler.attributes["vote"] == "no"
    aborts = [s for s in _children(abort_tx, tx) if s.name == "abort"]
    assert sorted(s.attributes["participant"] for s in aborts) == ["bank-b", "bank-c"]
    assert all(s.attributes.get("tx_id") for s in spans)


def test_recovery_after_a_restart_links_to_the_original_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exported: InMemorySpanExporter
) -> None:
    """A coordinator that restarts while committing re-sends COMMIT in a ``recover`` span."""
    world = World(tmp_path, monkeypatch)
    first = world.coordinator
    with Client("amqp://fake/") as client:
        client.submit_future(transfer(10), tx_id="tx-recover", timeout=10)
        world.run_until(lambda: first.core.state_of("tx-recover").value == "committing")
    # the coordinator "crashes" right after deciding: nobody sees its COMMITs
    with world.bus.lock:
        for name in world.banks:
            world.bus.queues[f"twophase.participant.{name}"].clear()
    first.decision_log.close()
    restarted = CoordinatorService.connect(
        CoordinatorConfig("amqp://fake/", str(tmp_path / "coordinator.log.db"))
    )
    world.drivers[0] = world.coordinator = restarted
    world.run_until(
        lambda: (
            restarted.stats.batches > 0 and restarted.core.state_of("tx-recover").value == "none"
        )
    )
    world.settle(0.2)
    tracing.force_flush()
    spans = _records(exported.get_finished_spans())
    (original,) = [s for s in spans if s.name == "submit"]
    (recover,) = [s for s in spans if s.name == "recover"]
    assert recover.trace_id != original.trace_id
    assert recover.links == (original.trace_id,)
    resent = [s for s in spans if s.parent_span_id == recover.span_id and s.name == "commit"]
    assert sorted(s.attributes["participant"] for s in resent) == ["bank-a", "bank-b", "bank-c"]


def test_the_endpoint_comes_from_the_standard_variables() -> None:
    assert tracing.endpoint_from_env({}) is None
    assert tracing.endpoint_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == (
        "http://c:4318"
    )
    traces = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}
    assert tracing.endpoint_from_env(traces) == "http://c:4318/v1/traces"
    assert tracing.endpoint_from_env({**traces, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing.endpoint_from_env({**traces, "OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing.endpoint_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}) is None


def test_clients_share_the_provider_they_set_up_and_the_last_one_shuts_it_down(
    monkeypatch: pytest.MonkeyPatch, no_otel_env: None
) -> None:
    assert not tracing.acquire("client")  # no endpoint: off, nothing to give back
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    assert tracing.acquire("client") and tracing.acquire("client")
    assert tracing.ENABLED
    tracing.release()
    assert tracing.ENABLED
    tracing.release()
    assert not tracing.ENABLED


def test_an_otlp_endpoint_without_the_tracing_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, no_otel_env: None
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ConfigurationError, match=r"pip install 'twophase\[tracing\]'"):
        tracing.setup_from_env("service")
    assert not tracing.ENABLED


def test_a_provider_the_application_set_up_is_left_alone(
    exported: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    assert not tracing.acquire("client")  # not counted: never shut down by a client
    assert not tracing.setup_from_env("service")  # already set up
    assert tracing.ENABLED


def test_traceparents_round_trip() -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ctx = tracing.context_from(traceparent)
    assert ctx is not None
    from opentelemetry import trace

    span = trace.get_current_span(ctx)
    assert tracing.traceparent_of(span) == traceparent
    assert tracing.trace_id_of(traceparent) == "0af7651916cd43dd8448eb211c80319c"
    assert tracing.context_from("") is None and tracing.context_from("garbage") is None
    assert tracing.trace_id_of("garbage") == "" and tracing.link_to("") == []


def test_a_refused_transaction_still_has_its_tx_span(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exported: InMemorySpanExporter
) -> None:
    world = World(tmp_path, monkeypatch)
    world.coordinator.core.started_ms -= 60_000  # past the start-up grace for heartbeats
    world.heartbeats()
    with Client("amqp://fake/") as client:
        future = client.submit_future(
            [Branch("bank-a", "debit", {"account": "bank-a-0", "amount": 1}), ("bank-z", "x", {})],
            tx_id="tx-refused",
            timeout=10,
        )
        world.run_until(future.done)
    outcome = future.result()
    assert outcome.outcome is OutcomeKind.ABORTED and outcome.at_fault == "bank-z"
    tracing.force_flush()
    spans = _records(exported.get_finished_spans())
    (submit,) = [s for s in spans if s.name == "submit"]
    (tx,) = _children(spans, submit)
    assert tx.name == "tx" and tx.error and tx.attributes["refused"] is True
    assert tx.attributes["at_fault"] == "bank-z"
    # no participant was asked: only the ABORT record's group commit
    assert [s.name for s in _children(spans, tx)] == ["decision-log write"]


def test_an_abort_that_overtakes_the_handler_is_a_no_vote_under_the_prepare_span(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exported: InMemorySpanExporter
) -> None:
    """PREPARE and ABORT in one batch: the handler runs, then the branch votes NO."""
    from schemas.codec import encode
    from schemas.messages import Abort, Prepare

    world = World(tmp_path, monkeypatch)
    worker = world.banks["bank-b"].worker
    assert worker is not None
    world.start()
    prepare_span = tracing.tracer().start_span("prepare")
    abort_span = tracing.tracer().start_span("abort")
    prepare = Prepare(
        tx_id="tx-race",
        participant="bank-b",
        operation="credit",
        args={"account": "bank-b-0", "amount": 5},
        deadline_ms=int(time.time() * 1000) + 10_000,
        participants=("bank-a", "bank-b"),
    )
    abort = Abort(tx_id="tx-race", participant="bank-b", reason="bank-a voted NO")
    queue = "twophase.participant.bank-b"
    world.bus.put(queue, encode(prepare), {"traceparent": tracing.traceparent_of(prepare_span)})
    world.bus.put(queue, encode(abort), {"traceparent": tracing.traceparent_of(abort_span)})
    worker.turn()
    prepare_span.end()
    abort_span.end()
    tracing.force_flush()
    spans = _records(exported.get_finished_spans())
    (handler,) = [s for s in spans if s.name == "handler credit"]
    (undo,) = [s for s in spans if s.name == "abort" and s.parent_span_id]
    assert handler.parent_span_id == f"{prepare_span.get_span_context().span_id:016x}"
    assert undo.parent_span_id == f"{abort_span.get_span_context().span_id:016x}"
    assert handler.attributes["prepared"] is True
    assert handler.attributes["vote"] == "no" and handler.error
    assert "aborted by the coordinator" in str(handler.attributes["reason"])
    assert worker.trace is not None and worker.trace.open_spans == 0


def test_the_abort_that_undoes_a_branch_is_the_parent_not_a_later_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exported: InMemorySpanExporter
) -> None:
    """The coordinator's ABORT and its presumed-abort answer to a late YES, in one batch."""
    from schemas.codec import encode
    from schemas.messages import Abort, Prepare

    world = World(tmp_path, monkeypatch)
    worker = world.banks["bank-c"].worker
    assert worker is not None
    world.start()
    spans = {name: tracing.tracer().start_span(name) for name in ("prepare", "abort", "late")}
    queue = "twophase.participant.bank-c"

    def put(message: Any, span: str) -> None:
        world.bus.put(queue, encode(message), {"traceparent": tracing.traceparent_of(spans[span])})

    put(
        Prepare(
            tx_id="tx-dup",
            participant="bank-c",
            operation="credit",
            args={"account": "bank-c-0", "amount": 5},
            deadline_ms=int(time.time() * 1000) + 10_000,
            participants=("bank-a", "bank-c"),
        ),
        "prepare",
    )
    worker.turn()
    put(Abort(tx_id="tx-dup", participant="bank-c", reason="bank-a voted NO"), "abort")
    put(Abort(tx_id="tx-dup", participant="bank-c", reason="presumed abort"), "late")
    worker.turn()
    for span in spans.values():
        span.end()
    tracing.force_flush()
    found = _records(exported.get_finished_spans())
    (undo,) = [s for s in found if s.name == "abort" and s.parent_span_id]
    assert undo.parent_span_id == f"{spans['abort'].get_span_context().span_id:016x}"
