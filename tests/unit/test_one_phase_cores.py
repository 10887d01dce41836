"""The one-phase optimisation, in both cores: a transaction's only branch commits in one round.

The vote COMMITTED is also the outcome, so nothing may be presumed about a missing one: the
coordinator asks with ``Abort(one_phase)`` until the participant answers NO or COMMITTED, and the
participant answers from memory, or from its log and resource.
"""

from __future__ import annotations

from typing import Any

from coordinator.core import (
    CoordinatorCore,
    CoordinatorSettings,
    HistoryLoaded,
    Recovered,
    TxState,
)
from participant.core import (
    AbortBranch,
    BranchExecuted,
    BranchHistory,
    BranchState,
    ExecuteBranch,
    LookUpBranch,
    ParticipantCore,
)
from schemas import topology
from schemas.effects import Incoming, Persist, ProtocolViolation, Send, StartTimer, TimerFired
from schemas.messages import (
    Abort,
    Branch,
    Commit,
    Outcome,
    OutcomeKind,
    Prepare,
    Vote,
    VoteKind,
)
from schemas.records import (
    BranchCompleted,
    BranchPrepared,
    CoordinatorRecord,
    Decision,
    TxAborted,
    TxBegun,
    TxCommitting,
)
from tests.unit import test_coordinator_core as cc
from tests.unit import test_participant_core as pc

NOW, TX = cc.NOW, cc.TX


def one_branch(core: CoordinatorCore | None = None) -> tuple[CoordinatorCore, list[Any]]:
    core = core or cc.fresh("a")
    core.handle(Incoming(cc.begin("a")), NOW)
    return core, core.handle(HistoryLoaded(TX, []), NOW)


def sent(effects: list[Any], kind: type[Any]) -> list[Any]:
    return [e.message for e in effects if isinstance(e, Send) and isinstance(e.message, kind)]


def answer(kind: VoteKind, participant: str = "a") -> Incoming:
    return Incoming(Vote(tx_id=TX, participant=participant, vote=kind, reason="r"))


# ---- the coordinator ------------------------------------------------------------------------


def test_a_single_branch_is_prepared_in_one_phase_and_its_begun_record_is_forced() -> None:
    _core, effects = one_branch()
    assert [cc.sig(e) for e in effects] == ["Persist(begun!)", "Prepare>a", "StartTimer(vote)"]
    begun = effects[0].record
    assert isinstance(begun, TxBegun) and begun.one_phase
    assert sent(effects, Prepare)[0].one_phase


def test_two_branches_or_the_setting_off_mean_two_phases() -> None:
    core = cc.started("a", "b")
    assert core.transactions[TX].one_phase is False
    off = cc.fresh("a")
    off.settings = CoordinatorSettings(liveness_timeout_ms=3_000, one_phase=False)
    _core, effects = one_branch(off)
    assert not sent(effects, Prepare)[0].one_phase
    # a COMMITTED vote in two phases is a protocol violation, and changes nothing
    (violation,) = off.handle(answer(VoteKind.COMMITTED), NOW)
    assert isinstance(violation, ProtocolViolation) and "COMMITTED" in violation.description
    assert off.state_of(TX) is TxState.VOTING


def test_a_committed_vote_is_durable_before_the_client_hears_it_and_ends_at_once() -> None:
    core, _ = one_branch()
    effects = core.handle(answer(VoteKind.COMMITTED), NOW)
    assert [cc.sig(e) for e in effects] == [
        "Persist(committing!)",
        "CancelTimer(vote)",
        "Outcome.committed>c1",
        "Persist(ended)",
        "Forget",
    ]
    persist = effects[0]
    assert isinstance(persist, Persist) and isinstance(persist.record, TxCommitting)
    assert persist.record.participants == ()  # no COMMIT, no ACK: phase two is gone
    assert core.state_of(TX) is TxState.NONE


def test_a_yes_vote_means_the_participant_declined_and_two_phases_follow() -> None:
    core, _ = one_branch()
    effects = core.handle(answer(VoteKind.YES), NOW)
    assert sent(effects, Commit) == [Commit(tx_id=TX, participant="a")]
    assert core.state_of(TX) is TxState.COMMITTING


def test_a_missing_vote_is_asked_for_with_backoff_never_presumed() -> None:
    core, _ = one_branch()
    effects = core.handle(TimerFired(("vote", TX)), NOW + 1_000)
    assert [cc.sig(e) for e in effects] == ["Abort>a", "StartTimer(resend)"]
    (question,) = sent(effects, Abort)
    assert question.one_phase and question.reason == "no vote from a within 1000 ms"
    assert core.state_of(TX) is TxState.RESOLVING
    assert not any(isinstance(e, Persist) for e in effects)  # no decision yet
    assert not sent(effects, Outcome)
    delays = []
    for k in range(3):
        again = core.handle(TimerFired(("resend", TX)), NOW + 2_000 + k)
        assert [cc.sig(e) for e in again] == ["Abort>a", "StartTimer(resend)"]
        timer = again[-1]
        assert isinstance(timer, StartTimer)
        delays.append(timer.deadline_ms - (NOW + 2_000 + k))
    assert delays == [1_000, 2_000, 4_000]


def asked_then_answered(kind: VoteKind) -> tuple[CoordinatorCore, list[Any]]:
    """The vote timed out, the question went out, and ``kind`` is the answer."""
    core, _ = one_branch()
    core.handle(TimerFired(("vote", TX)), NOW + 1_000)
    return core, core.handle(answer(kind), NOW + 1_100)


def test_the_answer_no_aborts_with_the_timeout_reason_and_committed_commits() -> None:
    _core, effects = asked_then_answered(VoteKind.NO)
    assert [cc.sig(e) for e in effects] == [
        "CancelTimer(resend)",
        "Persist(aborted!)",
        "Outcome.aborted>c1",
        "Forget",
    ]
    (outcome,) = sent(effects, Outcome)
    assert (outcome.reason, outcome.at_fault) == ("no vote from a within 1000 ms", "a")

    _core, effects = asked_then_answered(VoteKind.COMMITTED)
    assert [cc.sig(e) for e in effects] == [
        "Persist(committing!)",
        "CancelTimer(resend)",
        "Outcome.committed>c1",
        "Persist(ended)",
        "Forget",
    ]


def _begun(deadline_ms: int) -> list[CoordinatorRecord]:
    branches = (Branch("a", "op"),)
    return [
        TxBegun(
            tx_id=TX, branches=branches, deadline_ms=deadline_ms, reply_to=cc.CLIENT, one_phase=True
        )
    ]


def test_recovery_asks_about_an_undecided_one_phase_transaction_once_its_deadline_passed() -> None:
    core = CoordinatorCore(cc.SETTINGS, started_ms=NOW)
    effects = core.handle(Recovered({TX: _begun(NOW + 5_000)}), NOW)
    # before the deadline the PREPARE might still run: asking now could be overtaken by it
    assert effects == [StartTimer(("resend", TX), NOW + 5_000)]
    assert core.state_of(TX) is TxState.RESOLVING
    asked = core.handle(TimerFired(("resend", TX)), NOW + 5_000)
    assert [cc.sig(e) for e in asked] == ["Abort>a", "StartTimer(resend)"]
    committed = core.handle(answer(VoteKind.COMMITTED), NOW + 5_100)
    assert sent(committed, Outcome)[0].outcome is OutcomeKind.COMMITTED

    late = CoordinatorCore(cc.SETTINGS, started_ms=NOW)
    effects = late.handle(Recovered({TX: _begun(NOW - 1)}), NOW)
    assert [cc.sig(e) for e in effects] == ["Abort>a", "StartTimer(resend)"]
    assert "restarted" in sent(effects, Abort)[0].reason


def test_a_resubmission_that_finds_an_undecided_one_phase_record_asks_and_keeps_its_client() -> (
    None
):
    core = cc.fresh("a")
    other = topology.client_queue("c2")
    core.handle(Incoming(cc.begin("a", reply_to=other)), NOW)
    effects = core.handle(HistoryLoaded(TX, _begun(NOW - 1)), NOW)
    assert [cc.sig(e) for e in effects] == ["Abort>a", "StartTimer(resend)"]
    done = core.handle(answer(VoteKind.NO), NOW)
    assert [cc.sig(e) for e in done if isinstance(e, Send)] == [
        "Outcome.aborted>c1",
        "Outcome.aborted>c2",
    ]


def test_recovery_ends_a_commit_that_waits_for_no_acks() -> None:
    core = CoordinatorCore(cc.SETTINGS, started_ms=NOW)
    records: list[CoordinatorRecord] = [*_begun(NOW), TxCommitting(tx_id=TX, participants=())]
    effects = core.handle(Recovered({TX: records}), NOW)
    assert [cc.sig(e) for e in effects] == ["Persist(ended)", "Forget"]
    assert core.transactions == {}


def test_the_decision_records_stay_consistent_with_the_answer() -> None:
    core, effects = asked_then_answered(VoteKind.NO)
    records = [e.record for e in effects if isinstance(e, Persist)]
    assert isinstance(records[0], TxAborted) and records[0].at_fault == "a"
    assert core.handle(answer(VoteKind.COMMITTED), NOW + 1_200) == []  # late: NONE ignores it


# ---- the participant ------------------------------------------------------------------------


def one_phase_prepare(deadline_ms: int = pc.DEADLINE) -> Incoming:
    message = Prepare(
        tx_id=TX,
        participant=pc.ME,
        operation="debit",
        args={"amount": 5},
        deadline_ms=deadline_ms,
        participants=(pc.ME,),
        one_phase=True,
    )
    return Incoming(message)


def executing() -> ParticipantCore:
    core = ParticipantCore(pc.ME, pc.SETTINGS)
    effects = core.handle(one_phase_prepare(), NOW)
    assert effects == [ExecuteBranch(TX, "debit", {"amount": 5}, one_phase=True)]
    return core


def test_a_branch_committed_at_once_is_logged_before_it_votes_committed() -> None:
    core = executing()
    effects = core.handle(BranchExecuted(TX, ok=True, committed=True), NOW)
    assert [pc.sig(e) for e in effects] == [
        "Persist(completed.commit!)",
        "StartTimer(forget)",
        "Vote.committed",
    ]
    assert core.state_of(TX) is BranchState.COMMITTED
    assert core.handle(one_phase_prepare(), NOW) == []  # a duplicate PREPARE runs nothing
    assert [pc.sig(e) for e in core.handle(pc.ASK, NOW)] == ["Vote.committed"]


def test_a_branch_may_decline_one_phase_and_prepare_as_usual() -> None:
    core = executing()
    effects = core.handle(BranchExecuted(TX, ok=True), NOW)
    assert [pc.sig(e) for e in effects] == [
        "Persist(prepared!)",
        "Vote.yes",
        "StartTimer(inquire)",
    ]
    # the question then aborts it, and the answer is NO
    assert [pc.sig(e) for e in core.handle(pc.ASK, NOW)][-1] == "Vote.no"
    assert core.state_of(TX) is BranchState.ABORTED


def test_a_two_phase_branch_committed_at_once_is_a_protocol_violation() -> None:
    core = pc.participant_in(BranchState.EXECUTING)
    (violation,) = core.handle(BranchExecuted(TX, ok=True, committed=True), NOW)
    assert isinstance(violation, ProtocolViolation)
    assert core.state_of(TX) is BranchState.EXECUTING


def test_a_question_while_executing_is_answered_by_what_the_handler_did() -> None:
    core = executing()
    assert core.handle(pc.ASK, NOW) == []
    effects = core.handle(BranchExecuted(TX, ok=True, committed=True), NOW)
    assert [pc.sig(e) for e in effects][-1] == "Vote.committed"

    declined = executing()
    declined.handle(pc.ASK, NOW)
    effects = declined.handle(BranchExecuted(TX, ok=True), NOW)
    assert [pc.sig(e) for e in effects] == [
        "AbortBranch",
        "Persist(completed.abort)",
        "StartTimer(forget)",
        "Vote.no",
    ]


def asked() -> ParticipantCore:
    core = ParticipantCore(pc.ME, pc.SETTINGS)
    assert core.handle(pc.ASK, NOW) == [LookUpBranch(TX)]
    return core


def test_the_log_or_the_resource_answers_for_a_forgotten_branch() -> None:
    commit = BranchCompleted(tx_id=TX, participant=pc.ME, decision=Decision.COMMIT)
    core = asked()
    effects = core.handle(BranchHistory(TX, [commit]), NOW)
    assert [pc.sig(e) for e in effects] == ["StartTimer(forget)", "Vote.committed"]

    # committed in the resource, crashed before the record: the record is written now
    core = asked()
    effects = core.handle(BranchHistory(TX, [], resource_committed=True), NOW)
    assert [pc.sig(e) for e in effects] == [
        "Persist(completed.commit!)",
        "StartTimer(forget)",
        "Vote.committed",
    ]

    abort = BranchCompleted(tx_id=TX, participant=pc.ME, decision=Decision.ABORT)
    core = asked()
    effects = core.handle(BranchHistory(TX, [abort]), NOW)
    assert [pc.sig(e) for e in effects][-1] == "Vote.no"


def test_a_prepared_record_without_decision_is_rolled_back_before_the_no() -> None:
    prepared = BranchPrepared(
        tx_id=TX, participant=pc.ME, operation="debit", args={}, deadline_ms=pc.DEADLINE
    )
    core = asked()
    effects = core.handle(BranchHistory(TX, [prepared]), NOW)
    assert isinstance(effects[0], AbortBranch)
    assert [pc.sig(e) for e in effects][-1] == "Vote.no"


def test_the_tombstone_is_forced_and_a_late_prepare_then_votes_no_without_running() -> None:
    core = asked()
    effects = core.handle(BranchHistory(TX, []), NOW)
    tombstone = effects[0]
    assert isinstance(tombstone, Persist) and tombstone.force
    assert isinstance(tombstone.record, BranchCompleted)
    assert tombstone.record.decision is Decision.ABORT
    late = core.handle(one_phase_prepare(), NOW)
    assert [pc.sig(e) for e in late] == ["Vote.no"]
    assert not any(isinstance(e, ExecuteBranch) for e in late)
