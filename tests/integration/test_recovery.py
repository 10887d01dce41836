"""Failure detection and recovery (docs/architecture.md §3) with real processes, killed by PID.

The coordinator and three banks run as child processes (``twophase.processes.ServiceGroup``):
bank-a and bank-b on native PostgreSQL branches in ``pg_url``, bank-c on a SQLite reservation.
Heartbeats every 0.2 s and a 1 s liveness timeout keep failure detection quick.

Crash points: ``TWOPHASE_CRASHPOINTS=name`` alone cannot aim at one transaction, because every
batch passes every crash point, the recovery batch at start-up included (a process started with
``participant.after_persist`` armed exits before it has handled a single message). So a process is
started with a small ``sitecustomize`` hook (``TWOPHASE_TEST_CRASH_AFTER=KIND=POINT``, see
``SITECUSTOMIZE``) that arms the named crash point right after the first log append holding a
record of KIND: "committing=coordinator.after_persist" exits (status 86, through
``runtime.crashpoints``) with the COMMIT decision durable and not one COMMIT sent.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest
import sqlalchemy as sa

from coordinator.client import Client, OutcomeUnknown
from coordinator.log import DecisionLog
from participant.log import PrepareLog
from runtime.amqp import AmqpChannel
from runtime.store import database_url
from schemas import topology
from schemas.messages import Branch, Outcome, OutcomeKind
from schemas.records import (
    BranchCompleted,
    BranchPrepared,
    Decision,
    TxAborted,
    TxBegun,
    TxCommitting,
    TxEnded,
)
from twophase import bank
from twophase.processes import ServiceGroup

pytestmark = pytest.mark.integration

LIVENESS_S = 1.0
HEARTBEAT_S = 0.2
CRASH_STATUS = 86
BANKS = ("bank-a", "bank-b", "bank-c")
CRASH_AFTER_ENV = "TWOPHASE_TEST_CRASH_AFTER"

SITECUSTOMIZE = '''\
"""Written by tests/integration/test_recovery.py: arm a crash point once a record is durable.

TWOPHASE_TEST_CRASH_AFTER=KIND=POINT arms POINT (see runtime.crashpoints) right after the first
log append that holds a record of KIND, so the process exits at that batch's next boundary.
"""
import os

_kind, _, _point = os.environ.get("TWOPHASE_TEST_CRASH_AFTER", "").partition("=")
if _kind and _point:
    from schemas.codec import record_kind
    from runtime import crashpoints, journal

    crashpoints.parse(_point)  # a typo fails loudly, not silently
    _append = journal.Journal.append

    def _append_then_arm(self, records):
        _append(self, records)
        if any(record_kind(r) == _kind for r in records):
            crashpoints.arm(_point)

    journal.Journal.append = _append_then_arm
'''


def decided_in_log(
    cluster: Cluster, plan: Mapping[str, object], seen: Mapping[str, Outcome | None], client: Client
) -> dict[str, OutcomeKind]:
    """What the coordinator's log decided for each transaction of ``plan`` (the truth), checked
    against what the client was told: an answer it got must agree, and one it gave up waiting
    for is asked now and must agree too."""
    log = DecisionLog(str(cluster.workdir / "coordinator.log.db"))
    try:
        history = log.history(list(plan))
    finally:
        log.close()
    decided: dict[str, OutcomeKind] = {}
    for tx in plan:
        records = history.get(tx, [])
        if any(isinstance(r, TxCommitting) for r in records):
            decided[tx] = OutcomeKind.COMMITTED
            assert not any(isinstance(r, TxAborted) for r in records), records
        elif any(isinstance(r, TxAborted) for r in records):
            decided[tx] = OutcomeKind.ABORTED
        else:
            decided[tx] = OutcomeKind.UNKNOWN  # the coordinator never saw it
    for tx, outcome in seen.items():
        if outcome is not None:
            assert outcome.outcome is decided[tx], (tx, outcome, history.get(tx))
        else:  # the client gave up: asking now gives the logged answer
            try:
                status = client.status(tx, wait=10).outcome
            except OutcomeUnknown:
                status = None
            assert status is decided[tx], (tx, status, history.get(tx))
    return decided


def wait_for(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def kinds(records: Sequence[object]) -> list[type]:
    return [type(r) for r in records]


def gid(participant: str, tx_id: str) -> str:
    return f"twophase:{participant}:{tx_id}"


def transfer(
    amount: int,
    payer: str = "bank-a",
    payee: str = "bank-b",
    fee: str = "bank-c",
    account: int = 0,
) -> list[Branch]:
    """``amount + 1`` leaves the payer: ``amount`` to the payee, 1 to the fee bank."""
    return [
        Branch(payer, "debit", {"account": f"{payer}-{account}", "amount": amount + 1}),
        Branch(payee, "credit", {"account": f"{payee}-{account}", "amount": amount}),
        Branch(fee, "credit", {"account": f"{fee}-{account}", "amount": 1}),
    ]


Balances = dict[str, dict[str, int]]


def apply(expected: Balances, branches: Sequence[Branch]) -> None:
    """What committing ``branches`` does to the balances."""
    for b in branches:
        sign = -1 if b.operation == "debit" else 1
        expected[b.participant][b.args["account"]] += sign * b.args["amount"]


class Cluster:
    """The coordinator and bank-a/b/c as child processes, and read access to all their state."""

    def __init__(self, amqp_url: str, pg_url: str, workdir: Path) -> None:
        self.amqp_url, self.pg_url, self.workdir = amqp_url, pg_url, workdir
        self.services = ServiceGroup(
            amqp_url,
            workdir,
            extra_env={
                "TWOPHASE_LIVENESS_TIMEOUT": str(LIVENESS_S),
                "TWOPHASE_HEARTBEAT_INTERVAL": str(HEARTBEAT_S),
            },
        )
        self.dbs = {
            "bank-a": (pg_url, "postgres"),
            "bank-b": (pg_url, "postgres"),
            "bank-c": (str(workdir / "bank-c.db"), "reservation"),
        }
        self.hook_dir = workdir / "crash-hook"
        self.hook_dir.mkdir()
        (self.hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.initial: Balances = {}

    # ---- processes -------------------------------------------------------------------------

    def _crash_env(self, crash_after: str | None) -> dict[str, str]:
        if crash_after is None:
            return {}
        path = os.pathsep.join(filter(None, [str(self.hook_dir), os.environ.get("PYTHONPATH")]))
        return {"PYTHONPATH": path, CRASH_AFTER_ENV: crash_after}

    def open_accounts(self, accounts: int = 3, balance: int = 100) -> None:
        for name, (db, _) in self.dbs.items():
            bank.open_accounts(db, name, [(f"{name}-{i}", balance) for i in range(accounts)])
        self.initial = {n: {f"{n}-{i}": balance for i in range(accounts)} for n in self.dbs}

    def start_coordinator(self, crash_after: str | None = None) -> None:
        self.services.start_coordinator(**self._crash_env(crash_after))

    def start_bank(self, name: str, crash_after: str | None = None) -> None:
        db, kind = self.dbs[name]
        self.services.start_bank(name, db, kind, **self._crash_env(crash_after))

    def start_all(self) -> None:
        self.start_coordinator()
        for name in BANKS:
            self.start_bank(name)
        self.ready("coordinator", *BANKS)

    def ready(self, *names: str) -> None:
        queues = [
            topology.COORDINATOR_QUEUE if n == "coordinator" else topology.participant_queue(n)
            for n in names
        ]
        self.services.wait_ready(queues)

    def pid(self, name: str) -> int:
        return self.services.processes[name].pid

    def wait_crash(self, name: str, point: str) -> None:
        """``name`` exits at crash point ``point`` (and not otherwise)."""
        try:
            status = self.services.processes[name].wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not reach crash point {point}") from None
        output = self.services.output(name)
        assert status == CRASH_STATUS, f"{name} exited with {status}:\n{output}"
        assert f"crash point {point} reached" in output, output

    def purge(self, name: str) -> int:
        """Drop what waits in ``name``'s queue once its consumer is gone (lost messages)."""
        queue = topology.participant_queue(name)
        probe = AmqpChannel(self.amqp_url, connection_name="twophase-test-probe")
        try:
            wait_for(
                lambda: (probe.queue_counts(queue) or (0, 0))[1] == 0, what=f"{name} to disconnect"
            )
        finally:
            probe.close()
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            return int(connection.channel().queue_purge(queue).method.message_count)
        finally:
            connection.close()

    def close(self) -> None:
        for process in self.services.processes.values():
            if process.poll() is None:
                with suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)  # a SIGSTOPped one must hear SIGTERM
        self.services.stop_all()
        for name in self.services.processes:  # shown by pytest when the test failed
            print(f"---- {name} ----\n{self.services.output(name, 40)}")

    # ---- state -------------------------------------------------------------------------------

    def balances(self, name: str) -> dict[str, tuple[int, int]]:
        engine = sa.create_engine(database_url(self.dbs[name][0]))
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.text(f"SELECT id, balance, held FROM {bank.table_name(name)}")
                ).all()
        finally:
            engine.dispose()
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def wait_balances(self, expected: Balances, *names: str) -> None:
        """Every account of ``names`` (default: all banks) at its expected balance, none held."""
        names = names or BANKS

        def reached() -> bool:
            return all(
                self.balances(n) == {a: (v, 0) for a, v in expected[n].items()} for n in names
            )

        try:
            wait_for(reached, what="the expected balances")
        except AssertionError:
            found = {n: self.balances(n) for n in names}
            raise AssertionError(f"balances {found} != expected {expected}") from None

    def prepared_xacts(self) -> list[str]:
        with psycopg.connect(self.pg_url) as conn:
            rows = conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchall()
        return sorted(r[0] for r in rows)

    def decisions(self, tx_id: str) -> list[Any]:
        log = DecisionLog(str(self.workdir / "coordinator.log.db"))
        try:
            return log.history([tx_id]).get(tx_id, [])
        finally:
            log.close()

    def branch(self, name: str, tx_id: str) -> list[Any]:
        log = PrepareLog(str(self.workdir / f"{name}.log.db"), name)
        try:
            return log.history([tx_id]).get(tx_id, [])
        finally:
            log.close()

    def completion(self, name: str, tx_id: str) -> BranchCompleted | None:
        return next((r for r in self.branch(name, tx_id) if isinstance(r, BranchCompleted)), None)

    def wait_completion(self, name: str, tx_id: str) -> BranchCompleted:
        """The COMPLETED record of ``name``'s branch of ``tx_id``, once it is written."""
        found: list[BranchCompleted] = []

        def written() -> bool:
            completed = self.completion(name, tx_id)
            found.extend([completed] if completed else [])
            return bool(found)

        wait_for(written, what=f"{name} to finish its branch of {tx_id}")
        return found[0]

    def reservations(self, name: str) -> dict[str, str]:
        """tx_id -> state of every reservation of a reservation bank."""
        engine = sa.create_engine(database_url(self.dbs[name][0]))
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.text("SELECT tx_id, state FROM twophase_reservation WHERE participant = :p"),
                    {"p": name},
                ).all()
        finally:
            engine.dispose()
        return {r[0]: r[1] for r in rows}

    def commit_markers(self, name: str) -> set[str]:
        """tx_ids committed by a PostgreSQL bank (its commit-marker rows)."""
        with psycopg.connect(self.pg_url) as conn:
            rows = conn.execute(
                "SELECT tx_id FROM twophase_commit_marker WHERE participant = %s", (name,)
            ).fetchall()
        return {r[0] for r in rows}

    def committed_at(self, name: str) -> set[str]:
        if self.dbs[name][1] == "postgres":
            return self.commit_markers(name)
        return {tx for tx, state in self.reservations(name).items() if state == "committed"}

    def wait_until_settled(self, timeout: float = 120) -> None:
        """Until nothing is in doubt anywhere; else fail naming what still is."""
        try:
            wait_for(lambda: not self.in_doubt(), timeout=timeout, what="nothing in doubt")
        except AssertionError:
            raise AssertionError(f"still in doubt: {self.in_doubt()}") from None

    def in_doubt(self) -> dict[str, list[str]]:
        """Everything still undecided or unacknowledged, by where it is; empty when quiet."""
        found: dict[str, list[str]] = {}
        log = DecisionLog(str(self.workdir / "coordinator.log.db"))
        try:
            found["coordinator"] = sorted(log.unfinished_transactions())
        finally:
            log.close()
        for name in BANKS:
            prepare_log = PrepareLog(str(self.workdir / f"{name}.log.db"), name)
            try:
                found[name] = sorted(r.tx_id for r in prepare_log.unfinished_branches())
            finally:
                prepare_log.close()
        found["pg_prepared_xacts"] = self.prepared_xacts()
        found["bank-c reservations"] = sorted(
            tx for tx, state in self.reservations("bank-c").items() if state == "prepared"
        )
        return {k: v for k, v in found.items() if v}


@pytest.fixture
def cluster(amqp_url: str, pg_url: str, tmp_path: Path) -> Iterator[Cluster]:
    found = Cluster(amqp_url, pg_url, tmp_path)
    try:
        yield found
    finally:
        found.close()


def committed_transfer(client: Client, cluster: Cluster, expected: Balances, **kw: Any) -> None:
    """One transfer that must commit (a warm-up: every service has been seen working)."""
    branches = transfer(10, **kw)
    outcome = client.submit(branches, timeout=10)
    assert outcome.outcome is OutcomeKind.COMMITTED, outcome
    apply(expected, branches)
    cluster.wait_balances(expected)


def copy(balances: Balances) -> Balances:
    return {name: dict(accounts) for name, accounts in balances.items()}


# ---- participant failures before voting ---------------------------------------------------


def test_a_participant_down_longer_than_the_liveness_timeout_is_refused_at_once(
    cluster: Cluster,
) -> None:
    cluster.open_accounts()
    cluster.start_all()
    expected = copy(cluster.initial)
    with Client(cluster.amqp_url) as client:
        committed_transfer(client, cluster, expected)
        cluster.services.kill("bank-c")  # SIGKILL
        killed_at = time.monotonic()

        def refused_as_down() -> bool:
            # Until bank-c has been silent for the liveness timeout, a transfer is started and
            # waits out its vote timeout; either way it aborts naming bank-c.
            outcome = client.submit(transfer(1), timeout=1.0)
            assert outcome.outcome is OutcomeKind.ABORTED, outcome
            assert outcome.at_fault == "bank-c", outcome
            return "is down" in outcome.reason

        wait_for(refused_as_down, timeout=20, what="the coordinator to count bank-c as down")
        outcome = client.submit(transfer(5), tx_id="while-down", timeout=30)
        silent_for = time.monotonic() - killed_at

        assert outcome.outcome is OutcomeKind.ABORTED
        assert outcome.at_fault == "bank-c"
        found = re.fullmatch(
            r"participant 'bank-c' is down: last heartbeat (\d+\.\d) s ago", outcome.reason
        )
        assert found, outcome.reason
        assert LIVENESS_S <= float(found[1]) <= silent_for + 2 * HEARTBEAT_S
        # Refused before it started: no BEGUN, no PREPARE anywhere, only the durable answer.
        (aborted,) = cluster.decisions("while-down")
        assert isinstance(aborted, TxAborted) and aborted.at_fault == "bank-c"
        assert cluster.branch("bank-a", "while-down") == []
        assert cluster.branch("bank-b", "while-down") == []

        cluster.services.restart("bank-c")
        cluster.ready("bank-c")
        branches = transfer(3)

        def commits() -> bool:  # refused until the coordinator hears bank-c's heartbeat
            outcome = client.submit(branches, timeout=5)
            return outcome.outcome is OutcomeKind.COMMITTED

        wait_for(commits, what="a transfer to commit once bank-c is back")
        apply(expected, branches)
    assert cluster.branch("bank-c", "while-down") == []
    cluster.wait_balances(expected)
    wait_for(lambda: not cluster.in_doubt(), what="nothing in doubt")


def test_a_participant_stopped_just_now_is_named_by_the_vote_timeout(cluster: Cluster) -> None:
    cluster.open_accounts()
    cluster.start_all()
    expected = copy(cluster.initial)
    with Client(cluster.amqp_url) as client:
        committed_transfer(client, cluster, expected)
        os.kill(cluster.pid("bank-c"), signal.SIGSTOP)  # hung: connected, but silent
        try:
            outcome = client.submit(transfer(5), tx_id="while-stopped", timeout=2.0)
        finally:
            cluster.services.kill("bank-c")  # SIGKILL ends a stopped process too
        assert outcome.outcome is OutcomeKind.ABORTED
        assert outcome.at_fault == "bank-c"
        assert outcome.reason == "no vote from bank-c within 2000 ms"
        begun, aborted = cluster.decisions("while-stopped")
        assert isinstance(begun, TxBegun) and isinstance(aborted, TxAborted)
        assert aborted.at_fault == "bank-c"
        # bank-a and bank-b had prepared; the coordinator's ABORT rolls them back
        for name in ("bank-a", "bank-b"):
            assert cluster.wait_completion(name, "while-stopped").decision is Decision.ABORT
            assert kinds(cluster.branch(name, "while-stopped")) == [
                BranchPrepared,
                BranchCompleted,
            ]

        cluster.services.restart("bank-c")
        cluster.ready("bank-c")
        # Its late PREPARE (past the deadline) votes NO and never prepares anything.
        assert cluster.wait_completion("bank-c", "while-stopped").decision is Decision.ABORT
        assert kinds(cluster.branch("bank-c", "while-stopped")) == [BranchCompleted]
        branches = transfer(3)
        wait_for(
            lambda: client.submit(branches, timeout=5).outcome is OutcomeKind.COMMITTED,
            what="a transfer to commit once bank-c is back",
        )
        apply(expected, branches)
    cluster.wait_balances(expected)
    wait_for(lambda: not cluster.in_doubt(), what="nothing in doubt")


# ---- participant failures after preparing -------------------------------------------------


@pytest.mark.parametrize("abort_lost", [False, True], ids=["abort-queued", "abort-lost"])
def test_a_participant_that_crashed_before_its_yes_left_rolls_back_after_restart(
    cluster: Cluster, abort_lost: bool
) -> None:
    """PREPARED is durable (log and PostgreSQL) but the vote never left: the coordinator aborts
    by timeout. After a restart the branch is rolled back: by the queued ABORT, or, when that
    message is lost, by the answer to the branch's own inquiry (presumed abort)."""
    cluster.open_accounts()
    cluster.start_coordinator()
    cluster.start_bank("bank-a", crash_after="prepared=participant.after_persist")
    cluster.start_bank("bank-b")
    cluster.start_bank("bank-c")
    cluster.ready("coordinator", *BANKS)
    tx = "prepared-not-voted"
    with Client(cluster.amqp_url) as client:
        outcome = client.submit(transfer(10), tx_id=tx, timeout=2.0)
    cluster.wait_crash("bank-a", "participant.after_persist")
    assert outcome.outcome is OutcomeKind.ABORTED
    assert outcome.at_fault == "bank-a"
    assert outcome.reason == "no vote from bank-a within 2000 ms"
    # In doubt at bank-a: prepared in its log and in PostgreSQL, never decided.
    assert kinds(cluster.branch("bank-a", tx)) == [BranchPrepared]
    assert gid("bank-a", tx) in cluster.prepared_xacts()

    if abort_lost:
        assert cluster.purge("bank-a") >= 1  # the ABORT (and the unacked PREPARE) are gone
    cluster.start_bank("bank-a")  # without the crash point
    cluster.ready("bank-a")
    completed = cluster.wait_completion("bank-a", tx)
    assert completed.decision is Decision.ABORT
    if abort_lost:
        assert completed.reason == "no decision on record: presumed abort"  # inquiry answered
    wait_for(lambda: cluster.prepared_xacts() == [], what="no prepared branch left")
    cluster.wait_balances(cluster.initial)
    wait_for(lambda: not cluster.in_doubt(), what="nothing in doubt")
    assert [type(r) for r in cluster.decisions(tx)] == [TxBegun, TxAborted]


def test_a_participant_that_crashed_after_voting_yes_commits_after_restart(
    cluster: Cluster,
) -> None:
    """The YES left, then bank-a died before hearing COMMIT: the coordinator commits, bank-b and
    bank-c apply it, and bank-a commits its in-doubt branch when it comes back."""
    cluster.open_accounts()
    cluster.start_coordinator()
    cluster.start_bank("bank-a", crash_after="prepared=participant.after_publish")
    cluster.start_bank("bank-b")
    cluster.start_bank("bank-c")
    cluster.ready("coordinator", *BANKS)
    tx = "voted-then-crashed"
    branches = transfer(10)
    expected = copy(cluster.initial)
    apply(expected, branches)
    with Client(cluster.amqp_url) as client:
        outcome = client.submit(branches, tx_id=tx, timeout=5.0)
    assert outcome.outcome is OutcomeKind.COMMITTED, outcome
    cluster.wait_crash("bank-a", "participant.after_publish")
    cluster.wait_balances(expected, "bank-b", "bank-c")
    # bank-a's branch is in doubt; the coordinator cannot END the transaction without its ACK
    assert kinds(cluster.branch("bank-a", tx)) == [BranchPrepared]
    assert cluster.prepared_xacts() == [gid("bank-a", tx)]
    assert cluster.balances("bank-a")["bank-a-0"] == (100, 0)  # the debit is inside the branch
    assert kinds(cluster.decisions(tx)) == [TxBegun, TxCommitting]

    cluster.start_bank("bank-a")
    cluster.ready("bank-a")
    wait_for(lambda: cluster.prepared_xacts() == [], what="bank-a to commit its branch")
    cluster.wait_balances(expected)
    assert cluster.wait_completion("bank-a", tx).decision is Decision.COMMIT
    assert cluster.commit_markers("bank-a") == {tx}
    wait_for(lambda: TxEnded in kinds(cluster.decisions(tx)), what="the coordinator's END")
    assert kinds(cluster.decisions(tx)) == [TxBegun, TxCommitting, TxEnded]
    wait_for(lambda: not cluster.in_doubt(), what="nothing in doubt")


# ---- coordinator failures -----------------------------------------------------------------


def test_a_coordinator_that_crashed_after_its_commit_record_commits_every_branch_on_restart(
    cluster: Cluster,
) -> None:
    cluster.open_accounts()
    cluster.start_coordinator(crash_after="committing=coordinator.after_persist")
    for name in BANKS:
        cluster.start_bank(name)
    cluster.ready("coordinator", *BANKS)
    tx = "decided-then-crashed"
    branches = transfer(10)
    expected = copy(cluster.initial)
    apply(expected, branches)
    with Client(cluster.amqp_url, resend_after_s=1.0) as client:
        future = client.submit_future(branches, tx_id=tx, timeout=10.0)
        cluster.wait_crash("coordinator", "coordinator.after_persist")
        # The COMMIT decision is durable ...
        records = cluster.decisions(tx)
        assert kinds(records) == [TxBegun, TxCommitting]
        assert set(records[1].participants) == set(BANKS)
        # ... and not one COMMIT has left: every branch is still prepared, the client not told.
        assert cluster.prepared_xacts() == sorted([gid("bank-a", tx), gid("bank-b", tx)])
        assert cluster.reservations("bank-c") == {tx: "prepared"}
        for name in BANKS:
            assert kinds(cluster.branch(name, tx)) == [BranchPrepared]
        cluster.wait_balances(cluster.initial)
        assert not future.done()

        cluster.start_coordinator()  # without the crash point: recovery re-sends COMMIT
        cluster.ready("coordinator")
        outcome = future.result(timeout=60)
    assert outcome.outcome is OutcomeKind.COMMITTED, outcome
    cluster.wait_balances(expected)
    assert cluster.prepared_xacts() == []
    for name in BANKS:
        assert cluster.wait_completion(name, tx).decision is Decision.COMMIT
    wait_for(lambda: TxEnded in kinds(cluster.decisions(tx)), what="the coordinator's END")
    assert kinds(cluster.decisions(tx)) == [TxBegun, TxCommitting, TxEnded]
    wait_for(lambda: not cluster.in_doubt(), what="nothing in doubt")


def test_a_coordinator_that_crashed_before_deciding_aborts_on_restart(cluster: Cluster) -> None:
    """The PREPAREs left and every bank prepared and voted YES, but the coordinator died before
    it read a vote: on restart BEGUN without a decision is aborted and every branch rolls back."""
    cluster.open_accounts()
    cluster.start_coordinator(crash_after="begun=coordinator.after_publish")
    for name in BANKS:
        cluster.start_bank(name)
    cluster.ready("coordinator", *BANKS)
    tx = "begun-then-crashed"
    with Client(cluster.amqp_url, resend_after_s=1.0) as client:
        future = client.submit_future(transfer(10), tx_id=tx, timeout=10.0)
        cluster.wait_crash("coordinator", "coordinator.after_publish")
        for name in BANKS:  # the YES votes wait in the coordinator's queue
            wait_for(partial(cluster.branch, name, tx), what=f"{name} to prepare")
            assert kinds(cluster.branch(name, tx)) == [BranchPrepared]
        assert kinds(cluster.decisions(tx)) == [TxBegun]
        assert len(cluster.prepared_xacts()) == 2

        cluster.start_coordinator()
        cluster.ready("coordinator")
        outcome = future.result(timeout=60)
    assert outcome.outcome is OutcomeKind.ABORTED
    assert outcome.reason == "the coordinator restarted before deciding"
    assert outcome.at_fault is None
    for name in BANKS:
        assert cluster.wait_completion(name, tx).decision is Decision.ABORT
    wait_for(lambda: cluster.prepared_xacts() == [], what="no prepared branch left")
    cluster.wait_balances(cluster.initial)
    assert kinds(cluster.decisions(tx)) == [TxBegun, TxAborted]
    wait_for(lambda: not cluster.in_doubt(), what="nothing in doubt")


# ---- the broker -------------------------------------------------------------------------------


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120, check=True)


@contextmanager
def broker_stopped() -> Iterator[None]:
    """RabbitMQ's application stopped (every connection dropped); started again however the
    block ends. Durable queues and persistent messages survive."""
    try:
        rabbitmqctl("stop_app")
        yield
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")


LOAD_TRANSFERS = 200
LOAD_CONCURRENCY = 16
LOAD_ACCOUNTS = 50
LOAD_WAIT_S = 120.0


def load_plan() -> dict[str, list[Branch]]:
    """Transfers rotating the roles of the banks, each on its own accounts (little contention)."""
    plan = {}
    for i in range(LOAD_TRANSFERS):
        payer, payee, fee = BANKS[i % 3 :] + BANKS[: i % 3]
        plan[f"load-{i:03d}"] = transfer(1 + i % 7, payer, payee, fee, account=i % LOAD_ACCOUNTS)
    return plan


def drive_load(
    client: Client,
    plan: Mapping[str, list[Branch]],
    fault: Callable[[list[str]], None],
    *,
    concurrency: int = LOAD_CONCURRENCY,
    wait_s: float = LOAD_WAIT_S,
) -> dict[str, Outcome | None]:
    """Submit ``plan`` with ``concurrency`` in flight; once a third is answered, call ``fault``
    once with the transactions then in flight. Each transaction's outcome, or None when the
    client never learnt it (it gave up, or ``wait_s`` passed)."""
    seen: dict[str, Outcome | None] = {}
    faulted = False
    pending: dict[Future[Outcome], tuple[str, float]] = {}
    queue = list(plan)
    while queue or pending:
        while queue and len(pending) < concurrency:
            tx = queue.pop(0)
            future = client.submit_future(plan[tx], tx_id=tx, timeout=5.0)
            pending[future] = (tx, time.monotonic())
        if not faulted and len(seen) >= len(plan) // 3:
            faulted = True
            fault([tx for tx, _ in pending.values()])
        done, _ = wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
        for future in done:
            tx, _ = pending.pop(future)
            try:
                seen[tx] = future.result()
            except Exception:  # the client gave up on it
                seen[tx] = None
        for future, (tx, since) in list(pending.items()):
            if time.monotonic() - since > wait_s:
                future.cancel()
                del pending[future]
                seen[tx] = None
    assert faulted
    return seen


@pytest.mark.slow
def test_a_broker_restart_mid_load_loses_and_doubles_nothing(cluster: Cluster) -> None:
    cluster.open_accounts(LOAD_ACCOUNTS, 1_000)
    cluster.start_all()
    plan = load_plan()
    seen: dict[str, Outcome | None] = {}  # None: the client never learnt the outcome
    in_flight_at_restart: list[str] = []
    with Client(cluster.amqp_url) as client:

        def restart_broker(in_flight: list[str]) -> None:
            in_flight_at_restart.extend(in_flight)
            with broker_stopped():
                time.sleep(2.0)  # the outage, with a full window of transfers in flight

        seen.update(drive_load(client, plan, restart_broker))

        assert len(in_flight_at_restart) == LOAD_CONCURRENCY
        for name, process in cluster.services.processes.items():
            assert process.poll() is None, (
                f"{name} did not survive the broker restart:\n{cluster.services.output(name)}"
            )
        cluster.wait_until_settled()

        # The truth is the coordinator's log; what the client was told must agree with it.
        decided = decided_in_log(cluster, plan, seen, client)

    committed = {tx for tx, kind in decided.items() if kind is OutcomeKind.COMMITTED}
    told = [o.outcome.value if o else "unknown" for o in seen.values()]
    print(f"client saw {Counter(told)}; the log says {Counter(k.value for k in decided.values())}")
    print(f"in flight at the restart: {[(tx, decided[tx].value) for tx in in_flight_at_restart]}")
    assert committed, "nothing committed at all"
    assert sum(o is not None for o in seen.values()) > LOAD_TRANSFERS // 2
    # Exactly once: each bank applied every committed branch of its own, and nothing else ...
    for name in BANKS:
        mine = {tx for tx in committed if any(b.participant == name for b in plan[tx])}
        assert cluster.committed_at(name) == mine, name
    assert "prepared" not in cluster.reservations("bank-c").values()
    # ... once: the balances are those of applying the committed transfers one time each.
    expected = copy(cluster.initial)
    for tx in sorted(committed):
        apply(expected, plan[tx])
    cluster.wait_balances(expected)
    total = sum(sum(accounts.values()) for accounts in expected.values())
    assert total == sum(sum(accounts.values()) for accounts in cluster.initial.values())
