"""No outage of PostgreSQL or RabbitMQ stops a service (issue 12): each is restarted under load.

A coordinator and two banks run as child processes (``twophase.processes.ServiceGroup``), every
one of them on PostgreSQL: the coordinator's decision log, the banks' prepare logs and their
accounts (native branches, ``PostgresResource``) all live in the test's database. Transfers run
concurrently while PostgreSQL (``pg_ctlcluster ... restart``) or RabbitMQ (``rabbitmqctl
stop_app`` / ``start_app``) is restarted. Afterwards:

* the three processes are the ones started before (same PIDs, still running): they waited;
* every transfer submitted resolved, committed or aborted (one without an answer is asked with
  ``status`` until it has one);
* no native branch is left prepared, and the money is all there.

These restart shared servers, which disturbs tests running at the same time on this machine:
each test brings its server back in a ``finally`` and waits until it answers, even when failing.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import psycopg
import pytest

from coordinator.client import Client, OutcomeUnknown
from runtime.amqp import AmqpChannel
from runtime.errors import BrokerUnavailable
from schemas import topology
from schemas.messages import Branch, Outcome, OutcomeKind
from twophase import bank
from twophase.processes import ServiceGroup

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BANKS = ("bank-a", "bank-b")
ACCOUNTS = 20
OPENING = 1_000
PG_VERSION, PG_CLUSTER = "15", "main"
#: load before the outage, and after the server is back
LOAD_BEFORE_S, LOAD_AFTER_S = 2.0, 4.0
IN_FLIGHT = 12


# ---- the servers -------------------------------------------------------------------------------


def wait_until(answers: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not answers():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not answer within {timeout:.0f} s")
        time.sleep(0.2)


def postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def pg_ctl(action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, PG_CLUSTER, action],
        capture_output=True,
        timeout=120,
        check=False,
    )


@contextlib.contextmanager
def postgres_restored(url: str) -> Iterator[None]:
    """Whatever happens inside, PostgreSQL runs and answers afterwards."""
    try:
        yield
    finally:
        if not postgres_answers(url):
            pg_ctl("start")
        wait_until(lambda: postgres_answers(url), 120, "PostgreSQL")


def broker_answers(url: str) -> bool:
    try:
        AmqpChannel(url, connection_name="twophase-test-probe").close()
    except BrokerUnavailable:
        return False
    return True


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=120, check=False)


@contextlib.contextmanager
def broker_restored(url: str) -> Iterator[None]:
    """Whatever happens inside, the RabbitMQ application runs and answers afterwards."""
    try:
        yield
    finally:
        if not broker_answers(url):
            rabbitmqctl("start_app")
        wait_until(lambda: broker_answers(url), 120, "RabbitMQ")


# ---- the cluster and its load ------------------------------------------------------------------


class Cluster:
    def __init__(self, amqp_url: str, pg_url: str, workdir: Path) -> None:
        self.amqp_url, self.pg_url = amqp_url, pg_url
        self.services = ServiceGroup(
            amqp_url,
            workdir,
            extra_env={
                "TWOPHASE_LOG_URL": pg_url,
                "TWOPHASE_METRICS_PORT": "0",
                "TWOPHASE_HEARTBEAT_INTERVAL": "0.2",
                "TWOPHASE_LIVENESS_TIMEOUT": "3",
            },
        )
        for name in BANKS:
            accounts = [(f"{name}-{i}", OPENING) for i in range(ACCOUNTS)]
            bank.open_accounts(pg_url, name, accounts)

    def start(self) -> dict[str, int]:
        self.services.start_coordinator()
        for name in BANKS:
            self.services.start_bank(name, self.pg_url, "postgres")
        queues = [topology.COORDINATOR_QUEUE, *map(topology.participant_queue, BANKS)]
        self.services.wait_ready(queues)
        return self.pids()

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.services.processes.items()}

    def running(self) -> dict[str, bool]:
        return {name: p.poll() is None for name, p in self.services.processes.items()}

    def total(self) -> int:
        return sum(bank.totals(self.pg_url, name)[0] for name in BANKS)

    def prepared(self) -> list[str]:
        with psycopg.connect(self.pg_url) as conn:
            rows = conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchall()
        return [gid for (gid,) in rows]

    def output(self) -> str:
        return "\n".join(
            f"---- {name} ----\n{self.services.output(name, 60)}"
            for name in self.services.processes
        )

    def stop(self) -> None:
        self.services.stop_all()


class Load:
    """Transfers between the banks, ``IN_FLIGHT`` at a time, until stopped."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.futures: dict[str, Future[Outcome]] = {}
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._slots = threading.Semaphore(IN_FLIGHT)
        self._random = random.Random(12)
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=0.1):
                continue
            n += 1
            payer, payee = self._random.sample(BANKS, 2)
            amount = self._random.randint(1, 20)
            branches = [
                Branch(payer, "debit", {"account": self._account(payer), "amount": amount}),
                Branch(payee, "credit", {"account": self._account(payee), "amount": amount}),
            ]
            tx_id = f"tx-{n}"
            future = self.client.submit_future(branches, tx_id=tx_id, timeout=5.0)
            future.add_done_callback(lambda _f: self._slots.release())
            self.futures[tx_id] = future
            time.sleep(0.01)

    def _account(self, name: str) -> str:
        return f"{name}-{self._random.randrange(ACCOUNTS)}"

    def outcomes(self, deadline_s: float = 60.0) -> dict[str, OutcomeKind]:
        """Every submitted transaction's outcome: from its future, else asked with status."""
        found: dict[str, OutcomeKind] = {}
        deadline = time.monotonic() + deadline_s
        for tx_id, future in self.futures.items():
            try:
                found[tx_id] = future.result(max(0.1, deadline - time.monotonic())).outcome
            except TimeoutError:
                found[tx_id] = self._ask(tx_id, deadline)
        return found

    def _ask(self, tx_id: str, deadline: float) -> OutcomeKind:
        kind = OutcomeKind.UNKNOWN
        while time.monotonic() < deadline:
            try:
                kind = self.client.status(tx_id, wait=5.0).outcome
            except OutcomeUnknown:
                continue
            if kind in (OutcomeKind.COMMITTED, OutcomeKind.ABORTED):
                return kind
            time.sleep(0.5)
        return kind


def run_outage(cluster: Cluster, client: Client, outage: Callable[[], None]) -> None:
    """Load, the outage under load, load again; then every check."""
    before = cluster.start()
    total = cluster.total()
    try:
        with Load(client) as load:
            time.sleep(LOAD_BEFORE_S)
            outage()
            time.sleep(LOAD_AFTER_S)
        outcomes = load.outcomes()
        unresolved = {tx: kind for tx, kind in outcomes.items() if kind not in FINAL}
        assert not unresolved, f"unresolved: {unresolved}\n{cluster.output()}"
        assert cluster.running() == dict.fromkeys(before, True), cluster.output()
        assert cluster.pids() == before
        committed = sum(kind is OutcomeKind.COMMITTED for kind in outcomes.values())
        assert committed > 0, f"nothing committed of {len(outcomes)}\n{cluster.output()}"
        wait_until(lambda: not cluster.prepared(), 30, "every native branch to be decided")
        assert cluster.total() == total
        print(f"{len(outcomes)} transfers, {committed} committed\n{cluster.output()}")
    finally:
        cluster.stop()


FINAL = (OutcomeKind.COMMITTED, OutcomeKind.ABORTED)


@pytest.fixture
def cluster(amqp_url: str, pg_url: str, tmp_path: Path) -> Cluster:
    return Cluster(amqp_url, pg_url, tmp_path)


def test_postgres_restart_under_load(cluster: Cluster, pg_server: str) -> None:
    def restart() -> None:
        with postgres_restored(pg_server):
            pg_ctl("restart")
            wait_until(lambda: postgres_answers(pg_server), 60, "PostgreSQL")

    with Client(cluster.amqp_url) as client:
        run_outage(cluster, client, restart)


def test_rabbitmq_restart_under_load(cluster: Cluster) -> None:
    def restart() -> None:
        with broker_restored(cluster.amqp_url):
            rabbitmqctl("stop_app")
            time.sleep(3)
            rabbitmqctl("start_app")
            wait_until(lambda: broker_answers(cluster.amqp_url), 60, "RabbitMQ")

    with Client(cluster.amqp_url) as client:
        run_outage(cluster, client, restart)
