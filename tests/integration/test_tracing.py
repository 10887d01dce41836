"""One OpenTelemetry trace per transaction, across real processes and a real OTLP/HTTP receiver.

The coordinator and three bank participants run as separate processes that export to a tiny
OTLP/HTTP receiver in this test (``POST /v1/traces``, protobuf); the client runs here, with
tracing set up from the same ``OTEL_*`` variables. One committed and one aborted transaction
(insufficient funds at bank-a) must each give one trace::

    submit -> tx -> prepare x3 (+ commit x3 | abort x2) -> the participants' spans

Run with ``-s`` to see the committed trace printed as a tree.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from coordinator.client import Client
from runtime import tracing
from runtime.tracing import SpanRecord
from schemas import topology
from schemas.messages import Branch, OutcomeKind
from tests.otlp import OtlpReceiver
from twophase import bank
from twophase.processes import ServiceGroup

pytestmark = pytest.mark.integration

BANKS = ("bank-a", "bank-b", "bank-c")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    found = OtlpReceiver()
    yield found
    found.close()


@contextmanager
def running_services(
    amqp_url: str, workdir: Path, receiver: OtlpReceiver, export_delay_ms: int
) -> Iterator[ServiceGroup]:
    """The coordinator and three banks as processes exporting to ``receiver``."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": str(export_delay_ms),
        "TWOPHASE_METRICS_PORT": "0",
        "TWOPHASE_HEARTBEAT_INTERVAL": "0.2",
    }
    with ServiceGroup(amqp_url, workdir, extra_env=env) as group:
        group.start_coordinator(OTEL_SERVICE_NAME="coordinator")
        for name in BANKS:
            db = str(workdir / f"{name}.db")
            bank.open_accounts(db, name, [(f"{name}-0", 100)])
            group.start_bank(name, db, OTEL_SERVICE_NAME=name)
        group.wait_ready(
            [topology.COORDINATOR_QUEUE, *(topology.participant_queue(b) for b in BANKS)]
        )
        yield group


@pytest.fixture
def services(amqp_url: str, tmp_path: Path, receiver: OtlpReceiver) -> Iterator[ServiceGroup]:
    with running_services(amqp_url, tmp_path, receiver, export_delay_ms=100) as group:
        yield group


@pytest.fixture
def traced_client_env(receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client here sets tracing up from the same variables as the services."""
    assert not tracing.ENABLED
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "client")


def transfer(amount: int) -> list[Branch]:
    return [
        Branch("bank-a", "debit", {"account": "bank-a-0", "amount": amount + 1}),
        Branch("bank-b", "credit", {"account": "bank-b-0", "amount": amount}),
        Branch("bank-c", "credit", {"account": "bank-c-0", "amount": 1}),
    ]


def named(spans: list[SpanRecord], name: str, **attributes: object) -> list[SpanRecord]:
    return [
        s
        for s in spans
        if s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items())
    ]


def one(spans: list[SpanRecord], name: str, **attributes: object) -> SpanRecord:
    found = named(spans, name, **attributes)
    assert len(found) == 1, f"expected one {name} {attributes}, got {found}"
    return found[0]


def children(spans: list[SpanRecord], parent: SpanRecord, name: str) -> list[SpanRecord]:
    return [s for s in spans if s.parent_span_id == parent.span_id and s.name == name]


def complete(spans: list[SpanRecord], phase_two: str, finishers: int) -> bool:
    """The client's, the coordinator's and every participant's spans have arrived."""
    names = [(s.name, s.service) for s in spans]
    participant_finishes = sum(1 for n, svc in names if n == phase_two and svc in BANKS)
    handlers = sum(1 for n, svc in names if n.startswith("handler ") and svc in BANKS)
    return (
        ("submit", "client") in names
        and any(n == "tx" and svc == "coordinator" for n, svc in names)
        and handlers == 3
        and participant_finishes == finishers
    )


def wait_for_trace(
    receiver: OtlpReceiver, tx_id: str, phase_two: str, finishers: int, timeout: float = 30.0
) -> list[SpanRecord]:
    deadline = time.monotonic() + timeout
    while True:
        spans = receiver.trace_of(tx_id)
        if complete(spans, phase_two, finishers):
            time.sleep(0.5)  # stragglers of the same trace (the tx span ends last)
            return receiver.trace_of(tx_id)
        if time.monotonic() > deadline:
            raise AssertionError(
                f"trace of {tx_id} incomplete after {timeout} s:\n"
                + tracing.format_span_tree(spans)
            )
        time.sleep(0.1)


def test_each_transaction_is_one_trace_across_the_processes(
    services: ServiceGroup, receiver: OtlpReceiver, amqp_url: str, traced_client_env: None
) -> None:
    with Client(amqp_url) as client:
        assert tracing.ENABLED  # set up by the client from the environment
        committed = client.submit(transfer(10), tx_id="traced-commit", timeout=10)
        aborted = client.submit(transfer(500), tx_id="traced-abort", timeout=10)
    assert not tracing.ENABLED  # the client shut its provider down (and flushed) on close
    assert committed.outcome is OutcomeKind.COMMITTED, committed
    assert aborted.outcome is OutcomeKind.ABORTED and aborted.at_fault == "bank-a", aborted

    commit_trace = wait_for_trace(receiver, "traced-commit", "commit", 3)
    print("\ncommitted transaction traced-commit:\n" + tracing.format_span_tree(commit_trace))
    abort_trace = wait_for_trace(receiver, "traced-abort", "abort", 2)
    print("\naborted transaction traced-abort:\n" + tracing.format_span_tree(abort_trace))

    for tx_id, spans in (("traced-commit", commit_trace), ("traced-abort", abort_trace)):
        assert len({s.trace_id for s in spans}) == 1, f"{tx_id}: more than one trace"
        for span in spans:
            assert span.attributes.get("tx_id") == tx_id, span
        submit = one(spans, "submit")
        assert submit.service == "client" and submit.parent_span_id == ""
        (tx,) = children(spans, submit, "tx")
        assert tx.service == "coordinator"
        prepares = children(spans, tx, "prepare")
        assert sorted(str(p.attributes["participant"]) for p in prepares) == list(BANKS)
        for prepare in prepares:
            participant = str(prepare.attributes["participant"])
            operation = "debit" if participant == "bank-a" else "credit"
            (handler,) = children(spans, prepare, f"handler {operation}")
            assert handler.service == participant
            assert handler.attributes["participant"] == participant
            assert handler.attributes["operation"] == operation

    # committed: every vote YES, a commit span per participant ended by its ACK, and the
    # participant's commit of the resource under it
    tx = one(commit_trace, "tx")
    assert tx.attributes["outcome"] == "committed" and not tx.error
    for prepare in children(commit_trace, tx, "prepare"):
        assert prepare.attributes["vote"] == "yes" and not prepare.error
        (log_write,) = children(commit_trace, prepare, "prepare-log write")
        assert log_write.service == prepare.attributes["participant"]
    commits = children(commit_trace, tx, "commit")
    assert sorted(str(c.attributes["participant"]) for c in commits) == list(BANKS)
    for commit in commits:
        assert commit.service == "coordinator" and commit.attributes.get("acked") is True
        (done,) = children(commit_trace, commit, "commit")
        assert done.service == commit.attributes["participant"]
        assert commit.start_ns <= done.start_ns and done.end_ns <= commit.end_ns
    assert children(commit_trace, tx, "abort") == []
    assert tx.start_ns <= min(c.start_ns for c in commits)
    assert tx.end_ns >= max(c.end_ns for c in commits)  # the tx ends when it is forgotten

    # aborted: the refusing participant is named, with its reason, on its prepare span and
    # handler span; the tx span carries at_fault; the two others get an abort span each
    tx = one(abort_trace, "tx")
    assert tx.error and tx.attributes["outcome"] == "aborted"
    assert tx.attributes["at_fault"] == "bank-a"
    assert "insufficient funds" in str(tx.attributes["reason"])
    refused = one(abort_trace, "prepare", participant="bank-a")
    assert refused.error and refused.attributes["vote"] == "no"
    assert "insufficient funds" in str(refused.attributes["reason"])
    handler = one(abort_trace, "handler debit")
    assert handler.error and handler.attributes["vote"] == "no"
    for participant in ("bank-b", "bank-c"):
        prepare = one(abort_trace, "prepare", participant=participant)
        assert not prepare.error
    aborts = children(abort_trace, tx, "abort")
    assert sorted(str(a.attributes["participant"]) for a in aborts) == ["bank-b", "bank-c"]
    for abort in aborts:
        (undone,) = children(abort_trace, abort, "abort")
        assert undone.service == abort.attributes["participant"]
    assert children(abort_trace, tx, "commit") == []
    submit = one(abort_trace, "submit")
    assert submit.error and submit.attributes["at_fault"] == "bank-a"


def test_services_flush_their_spans_on_sigterm(
    amqp_url: str, tmp_path: Path, receiver: OtlpReceiver, traced_client_env: None
) -> None:
    """With a one-minute export delay, the spans can only arrive by the flush on SIGTERM."""
    with running_services(amqp_url, tmp_path, receiver, export_delay_ms=60_000) as group:
        with Client(amqp_url) as client:
            outcome = client.submit(transfer(10), tx_id="flushed", timeout=10)
        assert outcome.outcome is OutcomeKind.COMMITTED
        time.sleep(1.0)  # the tx ends on the last ACK, just after the client's answer
        assert {s.service for s in receiver.trace_of("flushed")} == {"client"}
        group.stop_all()
        for name, process in group.processes.items():
            assert process.returncode == -signal.SIGTERM, (name, group.output(name))
    spans = receiver.trace_of("flushed")
    assert {s.service for s in spans} == {"client", "coordinator", *BANKS}
    assert len(named(spans, "commit")) == 6  # the coordinator's three and the banks' three
    one(spans, "tx")
