"""One-phase commit with real processes: a transaction's only branch commits in one round.

The cluster of ``test_recovery`` (coordinator, bank-a on a native PostgreSQL branch, bank-c on a
SQLite reservation, both with SQLite logs) runs single-branch transfers. Crashes are aimed with
its ``TWOPHASE_TEST_CRASH_AFTER`` hook: the COMMITTED vote lost with the participant, a branch
killed after its commit and before its record, or between its prepare and its commit, and a
coordinator killed with its PREPARE sent.
"""

from __future__ import annotations

import time

import pytest

from coordinator.client import Client
from schemas.messages import Branch, OutcomeKind
from schemas.records import BranchCompleted, Decision, TxAborted, TxBegun, TxCommitting, TxEnded
from tests.integration import test_recovery
from tests.integration.test_recovery import BANKS, Cluster, apply, copy, kinds, wait_for

pytestmark = pytest.mark.integration
cluster = test_recovery.cluster  # the fixture: coordinator and banks as child processes

TIMEOUT_S = 2.0


def credit(bank: str, amount: int = 5) -> list[Branch]:
    return [Branch(bank, "credit", {"account": f"{bank}-0", "amount": amount})]


def start_with_crashing(cluster: Cluster, bank: str, crash_after: str) -> None:
    """The coordinator, bank-a and bank-c; ``bank`` with a crash point armed by a record."""
    cluster.open_accounts()
    cluster.start_coordinator()
    for name in ("bank-a", "bank-c"):
        cluster.start_bank(name, crash_after=crash_after if name == bank else None)
    cluster.ready("coordinator", "bank-a", "bank-c")


@pytest.mark.parametrize("bank", ["bank-a", "bank-c"], ids=["native-branch", "reservation"])
def test_a_single_branch_commits_in_one_round(cluster: Cluster, bank: str) -> None:
    cluster.open_accounts()
    cluster.start_all()
    expected = copy(cluster.initial)
    branches = credit(bank)
    with Client(cluster.amqp_url) as client:
        outcome = client.submit(branches, tx_id="one", timeout=10)
        assert outcome.outcome is OutcomeKind.COMMITTED, outcome
        # a single branch that refuses aborts, naming it and its reason
        debit = [Branch(bank, "debit", {"account": f"{bank}-0", "amount": 10_000})]
        refused = client.submit(debit, tx_id="too-much", timeout=10)
    apply(expected, branches)
    cluster.wait_balances(expected)
    assert refused.outcome is OutcomeKind.ABORTED and refused.at_fault == bank
    assert "voted NO" in refused.reason and "insufficient" in refused.reason.lower()

    begun, committing, ended = cluster.decisions("one")
    assert isinstance(begun, TxBegun) and begun.one_phase
    assert isinstance(committing, TxCommitting) and committing.participants == ()
    assert isinstance(ended, TxEnded)
    # no PREPARED record and no COMMIT/ACK round: the branch's only record is its commit
    (completed,) = cluster.branch(bank, "one")
    assert isinstance(completed, BranchCompleted) and completed.decision is Decision.COMMIT
    assert "one" in cluster.committed_at(bank)
    assert "too-much" not in cluster.committed_at(bank)
    wait_for(lambda: not cluster.in_doubt(), what="nothing in doubt")


def test_a_committed_vote_lost_with_the_participant_is_asked_for_and_heard(
    cluster: Cluster,
) -> None:
    """bank-a commits and logs it, then dies before its COMMITTED vote leaves. The vote
    timeout cannot presume abort: the coordinator asks, and the restarted bank answers from
    its log."""
    start_with_crashing(cluster, "bank-a", "completed=participant.after_persist")
    expected = copy(cluster.initial)
    branches = credit("bank-a")
    with Client(cluster.amqp_url) as client:
        future = client.submit_future(branches, tx_id="vote-lost", timeout=TIMEOUT_S)
        cluster.wait_crash("bank-a", "participant.after_persist")
        assert kinds(cluster.branch("bank-a", "vote-lost")) == [BranchCompleted]
        time.sleep(TIMEOUT_S + 0.5)  # past the vote timeout: the coordinator is asking
        assert not future.done(), "an outcome before the branch could answer"
        cluster.services.restart("bank-a")
        outcome = future.result(30)
    assert outcome.outcome is OutcomeKind.COMMITTED, outcome
    apply(expected, branches)
    cluster.wait_balances(expected, "bank-a")
    assert [type(r) for r in cluster.decisions("vote-lost")] == [TxBegun, TxCommitting, TxEnded]
    wait_for(lambda: not cluster.in_doubt(), what="nothing in doubt")


def test_a_branch_killed_before_its_record_is_answered_by_its_resource(cluster: Cluster) -> None:
    """bank-a commits the branch at once (a plain COMMIT with its commit marker) and dies
    before the COMPLETED record. Restarted past the deadline, it finds the marker when asked
    (or when the late PREPARE comes back) and answers COMMITTED."""
    # armed by the first commit (a warm-up), it fires in the next transaction's prepare
    start_with_crashing(cluster, "bank-a", "completed=participant.after_prepare")
    expected = copy(cluster.initial)
    warm_up, branches = credit("bank-a", 1), credit("bank-a")
    with Client(cluster.amqp_url) as client:
        assert client.submit(warm_up, timeout=10).outcome is OutcomeKind.COMMITTED
        future = client.submit_future(branches, tx_id="unrecorded", timeout=TIMEOUT_S)
        cluster.wait_crash("bank-a", "participant.after_prepare")
        assert "unrecorded" in cluster.committed_at("bank-a")
        assert cluster.branch("bank-a", "unrecorded") == []  # no record, no vote
        time.sleep(TIMEOUT_S + 0.5)
        cluster.services.restart("bank-a")
        outcome = future.result(30)
    assert outcome.outcome is OutcomeKind.COMMITTED, outcome
    apply(expected, warm_up)
    apply(expected, branches)
    cluster.wait_balances(expected, "bank-a")
    assert cluster.wait_completion("bank-a", "unrecorded").decision is Decision.COMMIT
    wait_for(lambda: not cluster.in_doubt(), what="nothing in doubt")


def test_a_branch_killed_between_its_prepare_and_its_commit_aborts(cluster: Cluster) -> None:
    """bank-c (a reservation in its own database) holds the branch, then dies before applying
    it. Restarted past the deadline, it releases the orphan hold, finds nothing committed, and
    answers NO."""
    start_with_crashing(cluster, "bank-c", "completed=participant.after_prepare")
    expected = copy(cluster.initial)
    warm_up = credit("bank-c", 1)
    with Client(cluster.amqp_url) as client:
        assert client.submit(warm_up, timeout=10).outcome is OutcomeKind.COMMITTED
        apply(expected, warm_up)
        future = client.submit_future(credit("bank-c"), tx_id="half-done", timeout=TIMEOUT_S)
        cluster.wait_crash("bank-c", "participant.after_prepare")
        assert cluster.reservations("bank-c").get("half-done") == "prepared"
        time.sleep(TIMEOUT_S + 0.5)  # the redelivered PREPARE will be too late to run
        cluster.services.restart("bank-c")
        outcome = future.result(30)
    assert outcome.outcome is OutcomeKind.ABORTED, outcome
    assert outcome.at_fault == "bank-c"
    assert outcome.reason == f"no vote from bank-c within {int(TIMEOUT_S * 1000)} ms"
    assert "half-done" not in cluster.committed_at("bank-c")
    completed = cluster.wait_completion("bank-c", "half-done")
    assert completed.decision is Decision.ABORT
    assert isinstance(cluster.decisions("half-done")[-1], TxAborted)
    cluster.wait_balances(expected, "bank-c")
    wait_for(lambda: not cluster.in_doubt(), what="nothing in doubt")


def test_a_coordinator_killed_after_its_prepare_left_asks_after_restart(cluster: Cluster) -> None:
    """The coordinator dies with TxBegun(one_phase) durable and the PREPARE sent. bank-a
    commits meanwhile. The restarted coordinator must not presume abort: the COMMITTED vote
    (or the answer to its question) decides, and the client hears COMMITTED."""
    cluster.open_accounts()
    cluster.start_coordinator(crash_after="begun=coordinator.after_publish")
    for name in BANKS:
        cluster.start_bank(name)
    cluster.ready("coordinator", *BANKS)
    expected = copy(cluster.initial)
    branches = credit("bank-a")
    with Client(cluster.amqp_url) as client:
        future = client.submit_future(branches, tx_id="coordinator-died", timeout=TIMEOUT_S)
        cluster.wait_crash("coordinator", "coordinator.after_publish")
        # bank-a commits without waiting for the dead coordinator; the PREPARE may still be
        # in its queue when the crash is seen, so wait for the commit rather than race it.
        wait_for(
            lambda: "coordinator-died" in cluster.committed_at("bank-a"),
            what="bank-a to commit the one-phase branch while the coordinator is down",
        )
        cluster.services.restart("coordinator")
        outcome = future.result(30)
    assert outcome.outcome is OutcomeKind.COMMITTED, outcome
    apply(expected, branches)
    cluster.wait_balances(expected, "bank-a")
    wait_for(lambda: not cluster.in_doubt(), what="nothing in doubt")
