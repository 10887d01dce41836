"""Late and duplicate messages for finished transactions are answered from the log (rule 4).

Found by the chaos bank: a participant that crashed twice re-ran a redelivered PREPARE of a
branch it had committed, voted YES again, and the coordinator, which had ENDED and forgotten the
transaction, presumed ABORT although its log said COMMIT.
"""

from __future__ import annotations

from coordinator.core import CoordinatorCore, HistoryLoaded, LookUp
from participant.core import ExecuteBranch, ParticipantCore, Recovered
from schemas import topology
from schemas.effects import Incoming, Persist, Send
from schemas.messages import (
    Abort,
    Ack,
    Begin,
    Branch,
    Commit,
    Heartbeat,
    Inquire,
    Prepare,
    Vote,
    VoteKind,
)
from schemas.records import BranchCompleted, Decision, TxCommitting

NOW = 1_000_000


def finished_commit(core: CoordinatorCore) -> list[object]:
    for name in ("a", "b"):
        core.handle(Incoming(Heartbeat(participant=name, sent_at_ms=NOW, interval_ms=1000)), NOW)
    begin = Begin(
        tx_id="t",
        branches=(Branch("a", "op"), Branch("b", "op")),
        timeout_ms=1000,
        reply_to="reply",
    )
    effects: list[object] = []
    for event in (Incoming(begin), HistoryLoaded("t", [])):
        effects += core.handle(event, NOW)
    for name in ("a", "b"):
        effects += core.handle(Incoming(Vote(tx_id="t", participant=name, vote=VoteKind.YES)), NOW)
    for name in ("a", "b"):
        effects += core.handle(Incoming(Ack(tx_id="t", participant=name)), NOW)
    return effects


def test_a_late_yes_vote_after_end_is_answered_commit_from_the_log() -> None:
    core = CoordinatorCore(started_ms=NOW)
    effects = finished_commit(core)
    decision = next(
        e.record for e in effects if isinstance(e, Persist) and isinstance(e.record, TxCommitting)
    )
    assert core.transactions == {}  # ENDED and forgotten
    late = core.handle(Incoming(Vote(tx_id="t", participant="a", vote=VoteKind.YES)), NOW)
    assert late == [LookUp("t")]
    answer = core.handle(HistoryLoaded("t", [decision]), NOW)
    assert answer == [Send(topology.participant_queue("a"), Commit(tx_id="t", participant="a"))]


def test_an_inquiry_for_a_transaction_without_a_decision_is_answered_abort() -> None:
    core = CoordinatorCore(started_ms=NOW)
    assert core.handle(Incoming(Inquire(tx_id="x", participant="a")), NOW) == [LookUp("x")]
    assert core.handle(Incoming(Inquire(tx_id="x", participant="a")), NOW) == []  # one look-up
    (answer,) = core.handle(HistoryLoaded("x", []), NOW)
    assert isinstance(answer, Send) and isinstance(answer.message, Abort)
    assert answer.queue == topology.participant_queue("a")


def test_a_late_no_vote_needs_no_answer() -> None:
    core = CoordinatorCore(started_ms=NOW)
    assert core.handle(Incoming(Vote(tx_id="y", participant="a", vote=VoteKind.NO)), NOW) == []


def test_a_recently_completed_branch_does_not_run_a_redelivered_prepare_again() -> None:
    core = ParticipantCore("a")
    done = BranchCompleted(tx_id="t", participant="a", decision=Decision.COMMIT)
    core.handle(Recovered([], completed=[done]), NOW)
    prepare = Prepare(
        tx_id="t",
        participant="a",
        operation="op",
        args={},
        deadline_ms=NOW + 5000,
        participants=("a",),
    )
    effects = core.handle(Incoming(prepare), NOW)
    assert not any(isinstance(e, ExecuteBranch) for e in effects)
    acks = core.handle(Incoming(Commit(tx_id="t", participant="a")), NOW)
    assert any(isinstance(e, Send) and isinstance(e.message, Ack) for e in acks)
