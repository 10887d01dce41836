"""The Prometheus endpoints of a real coordinator and participants under a small load.

The services run in this process (threads), each with its own ``CollectorRegistry``; the test
scrapes ``/metrics`` over HTTP during and after 30 transfers (every fifth refused for
insufficient funds) and checks the counters against the outcomes the client saw.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from coordinator.client import Client
from coordinator.core import CoordinatorSettings
from coordinator.service import CoordinatorConfig, CoordinatorService
from participant.worker import Participant
from schemas.messages import Branch, Outcome, OutcomeKind
from twophase import bank

pytestmark = pytest.mark.integration

BANKS = ("bank-a", "bank-b", "bank-c")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(check: Callable[[], None], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def coordinator_port(amqp_url: str, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    service = CoordinatorService.connect(
        CoordinatorConfig(
            amqp_url,
            str(tmp_path / "coordinator.log.db"),
            settings=CoordinatorSettings(liveness_timeout_ms=2_000),
            metrics_port=port,
            metrics_registry=CollectorRegistry(),
            participants=("bank-x",),
        )
    )
    thread = threading.Thread(target=service.serve_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        service.stop()
        thread.join(10)


@pytest.fixture
def participant_ports(amqp_url: str, tmp_path: Path) -> Iterator[dict[str, int]]:
    apps: list[Participant] = []
    ports = {}
    try:
        for name in BANKS:
            db = str(tmp_path / f"{name}.db")
            bank.open_accounts(db, name, [(f"{name}-{i}", 100) for i in range(3)])
            ports[name] = free_port()
            app = bank.create_bank(
                name,
                db,
                amqp_url=amqp_url,
                log_url=str(tmp_path / f"{name}.log.db"),
                heartbeat_interval_s=0.2,
                metrics_port=ports[name],
                metrics_registry=CollectorRegistry(),
            )
            app.start()
            apps.append(app)
        yield ports
    finally:
        for app in apps:
            app.stop()


def transfer(i: int) -> list[Branch]:
    payer, payee, fee = BANKS[i % 3], BANKS[(i + 1) % 3], BANKS[(i + 2) % 3]
    amount = 1_000 if i % 5 == 4 else 1  # every fifth: insufficient funds at the payer
    return [
        Branch(payer, "debit", {"account": f"{payer}-{i % 3}", "amount": amount + 1}),
        Branch(payee, "credit", {"account": f"{payee}-{i % 3}", "amount": amount}),
        Branch(fee, "credit", {"account": f"{fee}-{i % 3}", "amount": 1}),
    ]


def test_counters_match_the_outcomes_the_client_saw(
    coordinator_port: int, participant_ports: dict[str, int], amqp_url: str
) -> None:
    before = scrape(coordinator_port)
    assert value(before, "twophase_transactions_total", outcome="committed") == 0
    outcomes: list[Outcome] = []
    with Client(amqp_url) as client:
        futures: list[Future[Outcome]] = [
            client.submit_future(transfer(i), timeout=10) for i in range(15)
        ]
        outcomes += [f.result(30) for f in futures]
        futures = [client.submit_future(transfer(i), timeout=10) for i in range(15, 30)]
        during = scrape(coordinator_port)  # while the second half is in flight
        outcomes += [f.result(30) for f in futures]

    committed = sum(1 for o in outcomes if o.outcome is OutcomeKind.COMMITTED)
    aborted = sum(1 for o in outcomes if o.outcome is OutcomeKind.ABORTED)
    assert (committed, aborted) == (24, 6)

    in_flight = value(during, "twophase_transactions_total", outcome="committed") + value(
        during, "twophase_transactions_total", outcome="aborted"
    )
    assert 15 <= in_flight <= 30

    def settled() -> None:
        after = scrape(coordinator_port)
        assert value(after, "twophase_transactions_total", outcome="committed") == committed
        assert value(after, "twophase_transactions_total", outcome="aborted") == aborted
        # prepare: Begin -> decision for every transaction; commit: decision -> END
        assert value(after, "twophase_phase_seconds_count", phase="prepare") == 30
        assert value(after, "twophase_phase_seconds_count", phase="commit") == committed
        assert value(after, "twophase_in_doubt") == 0
        for name in BANKS:
            assert value(after, "twophase_participant_up", participant=name) == 1
        assert ("twophase_commit_resends_total", frozenset()) in after
        assert value(after, "twophase_log_flushes_total", service="coordinator") > 0
        assert value(after, "twophase_batch_messages_count", service="coordinator") > 0

    eventually(settled)

    def participants_settled() -> None:
        yes = no = 0.0
        for name, port in participant_ports.items():
            samples = scrape(port)
            yes += value(samples, "twophase_votes_total", participant=name, vote="yes")
            no += value(samples, "twophase_votes_total", participant=name, vote="no")
            assert value(samples, "twophase_participant_prepared", participant=name) == 0
            assert (
                value(samples, "twophase_participant_oldest_prepared_seconds", participant=name)
                == 0
            )
        # every transfer asked all three banks; an aborted one has the payer's NO (and may
        # have more: an ABORT that overtakes a PREPARE makes it vote NO too)
        assert no >= aborted
        assert yes >= 3 * committed and yes + no <= 90

    eventually(participants_settled)


def test_a_participant_that_stops_is_reported_down(
    coordinator_port: int, amqp_url: str, tmp_path: Path
) -> None:
    db = str(tmp_path / "bank-x.db")
    bank.open_accounts(db, "bank-x", [("bank-x-0", 100)])
    app = bank.create_bank(
        "bank-x",
        db,
        amqp_url=amqp_url,
        log_url=str(tmp_path / "bank-x.log.db"),
        heartbeat_interval_s=0.2,
    )
    app.start()
    try:
        eventually(
            lambda: _assert_eq(
                value(scrape(coordinator_port), "twophase_participant_up", participant="bank-x"),
                1,
            )
        )
    finally:
        app.stop()
    eventually(
        lambda: _assert_eq(
            value(scrape(coordinator_port), "twophase_participant_up", participant="bank-x"), 0
        )
    )


def _assert_eq(got: float, expected: float) -> None:
    assert got == expected, (got, expected)
