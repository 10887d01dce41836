"""One phase through the real drivers on the in-memory broker: counted messages and commits,
and the question ``Abort(one_phase)`` answered by a worker from memory, its log and its resource."""

from __future__ import annotations

from pathlib import Path

import pytest

from participant.operations import Refuse
from runtime.driver import now_ms
from runtime.memory import MemoryBroker
from schemas import topology
from schemas.codec import decode_message, encode
from schemas.messages import (
    Abort,
    Begin,
    Branch,
    Envelope,
    Enveloped,
    OutcomeKind,
    Prepare,
    Vote,
    VoteKind,
)
from schemas.records import BranchCompleted, Decision
from tests.unit import test_drivers
from tests.unit.test_drivers import REPLY, System, _count_commits, credit, unwrap

system = test_drivers.system  # the fixture: both with the log in its own and the resource's db


def test_a_single_branch_commits_with_four_messages(system: System) -> None:
    before = system.coordinator.stats.protocol_messages_out
    worker = system.workers["bank-b"]
    votes_before = worker.stats.protocol_messages_out
    system.client.publish(topology.COORDINATOR_QUEUE, encode(credit("o1", amount=7)))
    system.settle()
    assert [o.outcome for o in system.outcomes()] == [OutcomeKind.COMMITTED]
    assert system.balance("bank-b") == (107, 0)
    # Begin in; PREPARE and the answer out of the coordinator; one vote out of the bank
    assert system.coordinator.stats.protocol_messages_out - before == 2
    assert worker.stats.protocol_messages_out - votes_before == 1
    records = worker.prepare_log.history(["o1"])["o1"]
    assert [type(r) for r in records] == [BranchCompleted]
    assert isinstance(records[0], BranchCompleted) and records[0].decision is Decision.COMMIT


def test_with_the_log_in_the_resource_database_one_phase_is_one_commit_per_batch(
    tmp_path: Path,
) -> None:
    system = System(tmp_path, MemoryBroker(), shared=True)
    worker = system.workers["bank-b"]
    worker.turn()  # idle: the start-up chores
    resource_commits = _count_commits(worker.resource._engine)  # type: ignore[attr-defined]
    log_commits = _count_commits(worker.prepare_log.log.engine)
    begins = tuple(Enveloped(message=credit(f"b{i}")) for i in range(5))
    system.client.publish(topology.COORDINATOR_QUEUE, encode(Envelope(messages=begins)))
    system.coordinator.turn()
    worker.turn()  # five branches held, applied and logged: one local transaction
    assert (len(resource_commits), len(log_commits)) == (1, 0)
    system.settle()
    assert [o.outcome for o in system.outcomes()] == [OutcomeKind.COMMITTED] * 5
    assert system.balance("bank-b") == (105, 0)


def _ask(system: System, tx_id: str) -> Vote:
    """Send bank-b the one-phase question about ``tx_id``; its answer."""
    question = Abort(tx_id=tx_id, participant="bank-b", reason="no vote", one_phase=True)
    system.client.publish(topology.participant_queue("bank-b"), encode(question))
    system.workers["bank-b"].turn()
    (body,) = system.broker.bodies(topology.COORDINATOR_QUEUE)
    (answer,) = unwrap([decode_message(body)])
    assert isinstance(answer, Vote)
    system.broker.queues[topology.COORDINATOR_QUEUE].clear()
    return answer


def test_the_question_is_answered_from_memory_then_the_log_then_the_resource(
    system: System,
) -> None:
    worker = system.workers["bank-b"]
    system.client.publish(topology.COORDINATOR_QUEUE, encode(credit("asked")))
    system.settle()
    assert _ask(system, "asked").vote is VoteKind.COMMITTED  # from memory
    worker.core.branches.pop("asked")  # forgotten (remember_ms passed)
    assert _ask(system, "asked").vote is VoteKind.COMMITTED  # from the log
    worker.core.branches.pop("asked")
    assert worker.prepare_log.log.prune(["asked"]) == 1  # the log pruned it too
    assert _ask(system, "asked").vote is VoteKind.COMMITTED  # from the resource
    # what never ran here is tombstoned durably, then refused
    answer = _ask(system, "never-ran")
    assert answer.vote is VoteKind.NO
    (tombstone,) = worker.prepare_log.history(["never-ran"])["never-ran"]
    assert isinstance(tombstone, BranchCompleted) and tombstone.decision is Decision.ABORT


def test_a_refusal_of_a_branch_the_resource_already_committed_is_no_no(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between the resource's commit and the record, then a redelivered PREPARE whose
    handler fails (a database glitch, say): a NO would be taken for the outcome of a committed
    branch. The resource is asked first."""
    system = System(tmp_path, MemoryBroker(), shared=False)
    worker = system.workers["bank-b"]
    system.client.publish(topology.COORDINATOR_QUEUE, encode(credit("glitch")))
    system.settle()
    assert [o.outcome for o in system.outcomes()] == [OutcomeKind.COMMITTED]
    worker.core.branches.pop("glitch")  # as after a restart that lost the record
    assert worker.prepare_log.log.prune(["glitch"]) == 1
    monkeypatch.setattr(
        worker.resource,
        "prepare_many",
        lambda branches: [Refuse("connection reset")] * len(branches),
    )
    prepare = Prepare(
        tx_id="glitch",
        participant="bank-b",
        operation="credit",
        args={"account": "bank-b-0", "amount": 1},
        deadline_ms=now_ms() + 60_000,
        participants=("bank-b",),
        one_phase=True,
    )
    system.client.publish(topology.participant_queue("bank-b"), encode(prepare))
    worker.turn()
    (body,) = system.broker.bodies(topology.COORDINATOR_QUEUE)
    (vote,) = unwrap([decode_message(body)])
    assert isinstance(vote, Vote) and vote.vote is VoteKind.COMMITTED
    assert system.balance("bank-b") == (101, 0)  # applied once


def test_a_refused_single_branch_aborts_naming_it_in_both_log_placements(system: System) -> None:
    """The refusal is checked against the resource inside the batch's own unit: on SQLite a
    second connection would wait for the unit's write lock, which the same thread holds."""
    debit = Branch("bank-b", "debit", {"account": "bank-b-0", "amount": 10_000})
    begin = Begin(tx_id="too-much", branches=(debit,), timeout_ms=30_000, reply_to=REPLY)
    system.client.publish(topology.COORDINATOR_QUEUE, encode(begin))
    system.client.publish(topology.COORDINATOR_QUEUE, encode(credit("fine")))
    system.settle()
    outcomes = {o.tx_id: o for o in system.outcomes()}
    assert outcomes["fine"].outcome is OutcomeKind.COMMITTED
    refused = outcomes["too-much"]
    assert refused.outcome is OutcomeKind.ABORTED and refused.at_fault == "bank-b"
    assert "insufficient funds" in refused.reason
    assert system.balance("bank-b") == (101, 0)
