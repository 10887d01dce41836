"""A participant's core, pair by pair and rule by rule.

Every (state, event kind) pair is driven from a real core put into that state. Pairs outside
``TRANSITIONS`` must produce exactly one ProtocolViolation and change nothing; pairs inside must
produce exactly the effects written in ``EXPECTED``, in order (the order is the write-ahead
contract with the driver), and leave the branch in the state written there.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from participant.core import (
    EVENT_KINDS,
    TRANSITIONS,
    AbortBranch,
    BranchExecuted,
    BranchHistory,
    BranchState,
    CommitBranch,
    ExecuteBranch,
    LookUpBranch,
    ParticipantCore,
    ParticipantSettings,
    Recovered,
)
from schemas import topology
from schemas.effects import (
    CancelTimer,
    Incoming,
    Persist,
    ProtocolViolation,
    Send,
    StartTimer,
    TimerFired,
)
from schemas.messages import (
    Abort,
    Ack,
    Begin,
    Commit,
    Heartbeat,
    Inquire,
    Outcome,
    OutcomeKind,
    Prepare,
    StatusQuery,
    Vote,
    VoteKind,
)
from schemas.records import BranchCompleted, BranchPrepared, Decision

NOW = 1_000_000
TX = "t"
ME = "p"
DEADLINE = NOW + 1_000
SETTINGS = ParticipantSettings(inquire_after_ms=1_000, inquire_max_ms=8_000, remember_ms=60_000)


def prepare(deadline_ms: int = DEADLINE, tx: str = TX) -> Incoming:
    message = Prepare(
        tx_id=tx,
        participant=ME,
        operation="debit",
        args={"amount": 5},
        deadline_ms=deadline_ms,
        participants=(ME, "q"),
    )
    return Incoming(message)


def prepared_record(tx: str = TX) -> BranchPrepared:
    return BranchPrepared(
        tx_id=tx, participant=ME, operation="debit", args={"amount": 5}, deadline_ms=DEADLINE
    )


def participant_in(state: BranchState) -> ParticipantCore:
    core = ParticipantCore(ME, SETTINGS)
    if state is BranchState.NONE:
        return core
    if state is BranchState.LOOKING_UP:
        assert core.handle(ASK, NOW) == [LookUpBranch(TX)]
        return core
    assert core.handle(prepare(), NOW) == [ExecuteBranch(TX, "debit", {"amount": 5})]
    if state is not BranchState.EXECUTING:
        core.handle(BranchExecuted(TX, ok=True), NOW)
    if state is BranchState.COMMITTED:
        core.handle(Incoming(Commit(tx_id=TX, participant=ME)), NOW)
    if state is BranchState.ABORTED:
        core.handle(Incoming(Abort(tx_id=TX, participant=ME, reason="b said no")), NOW)
    assert core.state_of(TX) is state
    return core


#: the one-phase question: did the branch commit? (abort it if not)
ASK = Incoming(Abort(tx_id=TX, participant=ME, reason="no vote", one_phase=True))

EVENTS: dict[str, Any] = {
    "Abort:one_phase": ASK,
    "BranchHistory": BranchHistory(TX, []),
    "Prepare": prepare(),
    "BranchExecuted": BranchExecuted(TX, ok=True),
    "Commit": Incoming(Commit(tx_id=TX, participant=ME)),
    "Abort": Incoming(Abort(tx_id=TX, participant=ME, reason="vote timeout")),
    "Outcome": Incoming(Outcome(tx_id=TX, outcome=OutcomeKind.PENDING)),
    "Timer:inquire": TimerFired(("inquire", TX)),
    "Timer:forget": TimerFired(("forget", TX)),
    "Begin": Incoming(Begin(tx_id=TX, branches=(), timeout_ms=1_000, reply_to="r")),
    "Vote": Incoming(Vote(tx_id=TX, participant=ME, vote=VoteKind.YES)),
    "Ack": Incoming(Ack(tx_id=TX, participant=ME)),
    "Inquire": Incoming(Inquire(tx_id=TX, participant=ME)),
    "Heartbeat": Incoming(Heartbeat(participant=ME, sent_at_ms=NOW, interval_ms=1_000)),
    "StatusQuery": Incoming(StatusQuery(tx_id=TX, reply_to="r")),
}


def sig(effect: Any) -> str:
    """``Persist(prepared!)`` is forced; ``Vote.yes`` a vote sent to the coordinator."""
    if isinstance(effect, Persist):
        record = effect.record
        tag = str(type(record).__struct_config__.tag)
        if isinstance(record, BranchCompleted):
            tag += f".{record.decision.value}"
        return f"Persist({tag}{'!' if effect.force else ''})"
    if isinstance(effect, Send):
        assert effect.queue == topology.COORDINATOR_QUEUE
        m = effect.message
        return f"Vote.{m.vote.value}" if isinstance(m, Vote) else type(m).__name__
    if isinstance(effect, StartTimer | CancelTimer):
        return f"{type(effect).__name__}({effect.key[0]})"
    return type(effect).__name__


N, E, R = BranchState.NONE, BranchState.EXECUTING, BranchState.PREPARED
C, A, L = BranchState.COMMITTED, BranchState.ABORTED, BranchState.LOOKING_UP

#: (state, event kind) -> (state after, the effects in order) for every pair in the table
EXPECTED: dict[tuple[BranchState, str], tuple[BranchState, list[str]]] = {
    (N, "Prepare"): (E, ["ExecuteBranch"]),
    (E, "Prepare"): (E, []),  # a duplicate while the handler runs
    (R, "Prepare"): (R, ["Vote.yes"]),  # the coordinator may have missed the vote
    (C, "Prepare"): (C, []),
    (A, "Prepare"): (A, ["Vote.no"]),
    (E, "BranchExecuted"): (
        R,
        ["Persist(prepared!)", "Vote.yes", "StartTimer(inquire)"],
    ),
    (N, "Commit"): (N, ["Ack"]),  # committed and forgotten long ago
    (R, "Commit"): (
        C,
        [
            "CommitBranch",
            "CancelTimer(inquire)",
            "Persist(completed.commit!)",
            "StartTimer(forget)",
            "Ack",
        ],
    ),
    (C, "Commit"): (C, ["Ack"]),
    (A, "Commit"): (A, ["ProtocolViolation"]),  # a heuristic hazard: reported, never applied
    (N, "Abort"): (A, ["Persist(completed.abort)", "StartTimer(forget)"]),
    (E, "Abort"): (E, []),  # remembered: the handler's result will be rolled back
    (R, "Abort"): (
        A,
        ["AbortBranch", "CancelTimer(inquire)", "Persist(completed.abort)", "StartTimer(forget)"],
    ),
    (C, "Abort"): (C, ["ProtocolViolation"]),
    (A, "Abort"): (A, []),
    **{(s, "Outcome"): (s, []) for s in BranchState},
    (R, "Timer:inquire"): (R, ["Inquire", "StartTimer(inquire)"]),
    (N, "Timer:inquire"): (N, []),
    (E, "Timer:inquire"): (E, []),
    (C, "Timer:inquire"): (C, []),
    (A, "Timer:inquire"): (A, []),
    (C, "Timer:forget"): (N, ["Forget"]),
    (A, "Timer:forget"): (N, ["Forget"]),
    (N, "Timer:forget"): (N, []),
    (E, "Timer:forget"): (E, []),
    (R, "Timer:forget"): (R, []),  # a prepared branch is never forgotten
    (N, "Abort:one_phase"): (L, ["LookUpBranch"]),  # it may have committed and been forgotten
    (L, "Abort:one_phase"): (L, []),  # answered when the log is read
    (E, "Abort:one_phase"): (E, []),  # answered when the handler is done
    (R, "Abort:one_phase"): (  # it declined one phase and prepared
        A,
        [
            "AbortBranch",
            "CancelTimer(inquire)",
            "Persist(completed.abort)",
            "StartTimer(forget)",
            "Vote.no",
        ],
    ),
    (C, "Abort:one_phase"): (C, ["Vote.committed"]),
    (A, "Abort:one_phase"): (A, ["Vote.no"]),
    # nothing in the log or the resource: a forced tombstone, then NO
    (L, "BranchHistory"): (A, ["Persist(completed.abort!)", "StartTimer(forget)", "Vote.no"]),
    (L, "Prepare"): (L, []),
    (L, "Abort"): (L, []),
    (L, "Timer:inquire"): (L, []),
    (L, "Timer:forget"): (L, []),
}

PAIRS = [(state, kind) for state in BranchState for kind in EVENT_KINDS]


def test_the_expectations_are_the_table() -> None:
    assert set(EXPECTED) == set(TRANSITIONS)
    assert set(TRANSITIONS) <= set(PAIRS)


@pytest.mark.parametrize(("state", "kind"), PAIRS, ids=[f"{s.name}-{k}" for s, k in PAIRS])
def test_every_state_meets_every_event(state: BranchState, kind: str) -> None:
    core = participant_in(state)
    before = copy.deepcopy(vars(core))
    effects = core.handle(EVENTS[kind], NOW)
    if (state, kind) not in TRANSITIONS:
        assert len(effects) == 1
        assert isinstance(effects[0], ProtocolViolation)
        assert effects[0].tx_id == ("" if kind == "Heartbeat" else TX)
        assert kind in effects[0].description
        assert vars(core) == before, "a rejected event changed the core"
        return
    after, expected = EXPECTED[state, kind]
    assert [sig(e) for e in effects] == expected
    assert core.state_of(TX) is after


def test_a_message_for_another_participant_is_rejected() -> None:
    core = participant_in(R)
    before = copy.deepcopy(vars(core))
    effects = core.handle(Incoming(Commit(tx_id=TX, participant="q")), NOW)
    assert [sig(e) for e in effects] == ["ProtocolViolation"]
    assert vars(core) == before


# ---- the write-ahead rules --------------------------------------------------------------------


def test_yes_leaves_only_after_the_forced_prepared_record() -> None:
    core = participant_in(E)
    effects = core.handle(BranchExecuted(TX, ok=True), NOW)
    record, yes, timer = effects
    assert isinstance(record, Persist) and record.force
    assert record.record == prepared_record()
    assert isinstance(yes, Send) and yes.message == Vote(
        tx_id=TX, participant=ME, vote=VoteKind.YES
    )
    assert timer == StartTimer(("inquire", TX), DEADLINE + SETTINGS.inquire_after_ms)


def test_ack_leaves_only_after_the_commit_and_its_forced_completed_record() -> None:
    core = participant_in(R)
    effects = core.handle(Incoming(Commit(tx_id=TX, participant=ME)), NOW)
    assert effects[0] == CommitBranch(TX, "debit", {"amount": 5})
    forced = [i for i, e in enumerate(effects) if isinstance(e, Persist) and e.force]
    (ack,) = [i for i, e in enumerate(effects) if isinstance(e, Send)]
    assert len(forced) == 1 and 0 < forced[0] < ack
    completed = effects[forced[0]]
    assert isinstance(completed, Persist)
    assert completed.record == BranchCompleted(tx_id=TX, participant=ME, decision=Decision.COMMIT)


def test_a_refusing_handler_votes_no_with_its_reason() -> None:
    core = participant_in(E)
    effects = core.handle(BranchExecuted(TX, ok=False, reason="insufficient funds"), NOW)
    assert [sig(e) for e in effects] == [
        "Persist(completed.abort)",
        "StartTimer(forget)",
        "Vote.no",
    ]
    vote = effects[-1]
    assert isinstance(vote, Send) and isinstance(vote.message, Vote)
    assert vote.message.reason == "insufficient funds"
    assert core.state_of(TX) is A


def test_an_abort_before_its_prepare_makes_the_prepare_vote_no_without_running() -> None:
    core = ParticipantCore(ME, SETTINGS)
    core.handle(Incoming(Abort(tx_id=TX, participant=ME, reason="vote timeout")), NOW)
    effects = core.handle(prepare(), NOW)
    assert [sig(e) for e in effects] == ["Vote.no"]
    assert not any(isinstance(e, ExecuteBranch) for e in effects)


def test_an_abort_while_the_handler_runs_rolls_back_and_never_votes_yes() -> None:
    core = participant_in(E)
    assert core.handle(Incoming(Abort(tx_id=TX, participant=ME)), NOW) == []
    effects = core.handle(BranchExecuted(TX, ok=True), NOW)
    assert [sig(e) for e in effects] == [
        "AbortBranch",
        "Persist(completed.abort)",
        "StartTimer(forget)",
        "Vote.no",
    ]
    assert core.state_of(TX) is A


def test_a_prepare_after_its_deadline_votes_no_and_runs_nothing() -> None:
    core = ParticipantCore(ME, SETTINGS)
    effects = core.handle(prepare(deadline_ms=NOW - 5), NOW)
    assert [sig(e) for e in effects] == ["Vote.no"]
    vote = effects[0]
    assert isinstance(vote, Send) and isinstance(vote.message, Vote)
    assert "5 ms after its deadline" in vote.message.reason
    # nothing ran, so nothing is logged or remembered: a COMMIT for a branch that committed
    # here and was forgotten since must still be ACKed
    assert core.state_of(TX) is N
    assert [sig(e) for e in core.handle(EVENTS["Commit"], NOW)] == ["Ack"]


def test_inquiries_back_off_doubling_up_to_the_maximum() -> None:
    core = participant_in(R)
    now, delays = DEADLINE + SETTINGS.inquire_after_ms, []
    for _ in range(5):
        effects = core.handle(TimerFired(("inquire", TX)), now)
        assert [sig(e) for e in effects] == ["Inquire", "StartTimer(inquire)"]
        timer = effects[-1]
        assert isinstance(timer, StartTimer)
        delays.append(timer.deadline_ms - now)
        now = timer.deadline_ms
    assert delays == [2_000, 4_000, 8_000, 8_000, 8_000]


def test_pending_from_the_coordinator_changes_nothing() -> None:
    core = participant_in(R)
    before = copy.deepcopy(vars(core))
    assert core.handle(Incoming(Outcome(tx_id=TX, outcome=OutcomeKind.PENDING)), NOW) == []
    assert vars(core) == before


# ---- recovery ---------------------------------------------------------------------------------


def test_recovery_inquires_for_a_prepared_branch_still_prepared_in_the_resource() -> None:
    core = ParticipantCore(ME, SETTINGS)
    effects = core.handle(Recovered([prepared_record()], frozenset({TX})), NOW)
    assert [sig(e) for e in effects] == ["Inquire", "StartTimer(inquire)"]
    assert core.in_doubt() == [TX]
    # the answer finishes it
    effects = core.handle(EVENTS["Commit"], NOW)
    assert sig(effects[0]) == "CommitBranch"


def test_recovery_acks_a_branch_committed_in_the_resource_after_forcing_its_record() -> None:
    core = ParticipantCore(ME, SETTINGS)
    effects = core.handle(Recovered([prepared_record()], frozenset(), frozenset({TX})), NOW)
    assert [sig(e) for e in effects] == ["Persist(completed.commit!)", "StartTimer(forget)", "Ack"]
    assert core.state_of(TX) is C


def test_recovery_finishes_a_branch_the_resource_rolled_back() -> None:
    core = ParticipantCore(ME, SETTINGS)
    effects = core.handle(Recovered([prepared_record()]), NOW)
    assert [sig(e) for e in effects] == ["Persist(completed.abort)", "StartTimer(forget)"]
    assert core.state_of(TX) is A


def test_recovery_rolls_back_a_resource_branch_that_never_voted_yes() -> None:
    core = ParticipantCore(ME, SETTINGS)
    effects = core.handle(Recovered([], frozenset({"orphan", "orphan2"})), NOW)
    assert effects == [AbortBranch("orphan", "", {}), AbortBranch("orphan2", "", {})]
    assert core.state_of("orphan") is N


@pytest.mark.parametrize(
    ("decision", "state", "answer"),
    [(Decision.COMMIT, C, []), (Decision.ABORT, A, ["Vote.no"])],
)
def test_recovery_remembers_recent_completions_so_a_redelivered_prepare_never_runs(
    decision: Decision, state: BranchState, answer: list[str]
) -> None:
    core = ParticipantCore(ME, SETTINGS)
    done = BranchCompleted(tx_id=TX, participant=ME, decision=decision)
    effects = core.handle(Recovered([], completed=[done]), NOW)
    assert effects == [StartTimer(("forget", TX), NOW + SETTINGS.remember_ms)]
    assert core.state_of(TX) is state
    assert [sig(e) for e in core.handle(prepare(), NOW)] == answer


# ---- a property over arbitrary event sequences ------------------------------------------------

STEPS = st.sampled_from(
    [
        "prepare",
        "late prepare",
        "handler returns",
        "handler refuses",
        "commit",
        "abort",
        "inquire timer",
        "forget timer",
        "restart",  # a crash: a new core recovers from the forced records and the resource
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(STEPS, max_size=30))
def test_rules_1_4_and_6_hold_over_any_sequence_of_events(steps: list[str]) -> None:
    """YES only with a durable PREPARED record; ACK only once the commit is durable in the
    resource and the log; a committed branch never runs again nor is rolled back. The resource
    behaves like ``ReservationResource``; the coordinator decides once, COMMIT only after a YES;
    only forced records survive a restart."""
    event: Any
    core, log, timers = ParticipantCore(ME, SETTINGS), list[Any](), dict[Any, int]()
    resource, running, voted_yes, decision = "none", False, False, ""
    now, event = NOW, None
    for step in steps:
        now, event = now + 1, None
        if step == "prepare":
            event = prepare()
        elif step == "late prepare":
            event = prepare(deadline_ms=now - 1)
        elif step == "handler returns" and running:
            running, ok = False, resource != "aborted"
            resource = "prepared" if resource == "none" else resource
            event = BranchExecuted(TX, ok=ok)
        elif step == "handler refuses" and running and resource == "none":
            running, event = False, BranchExecuted(TX, ok=False, reason="no")
        elif step == "commit" and voted_yes and decision != "abort":
            decision, event = "commit", Incoming(Commit(tx_id=TX, participant=ME))
        elif step == "abort" and decision != "commit":
            decision, event = "abort", Incoming(Abort(tx_id=TX, participant=ME))
        elif step.endswith("timer") and (key := (step.split()[0], TX)) in timers:
            now, event = max(now, timers.pop(key)), TimerFired(key)
        elif step == "restart":
            done = [r for r in log if isinstance(r, BranchCompleted)]
            unfinished = [r for r in log if isinstance(r, BranchPrepared)] if not done else []
            core, running, timers = ParticipantCore(ME, SETTINGS), False, {}
            event = Recovered(
                unfinished,
                frozenset({TX}) if resource == "prepared" else frozenset(),
                frozenset({TX}) if resource == "committed" and unfinished else frozenset(),
                completed=done,
            )
        if event is None:
            continue  # that step cannot happen now
        for effect in core.handle(event, now):
            if isinstance(effect, Persist) and effect.force:
                log.append(effect.record)
            elif isinstance(effect, StartTimer):
                timers[effect.key] = effect.deadline_ms
            elif isinstance(effect, CancelTimer):
                timers.pop(effect.key, None)
            elif isinstance(effect, ExecuteBranch):
                assert resource != "committed", "rule 4: a committed branch ran again"
                running = True
            elif isinstance(effect, CommitBranch):
                assert resource in ("prepared", "committed"), "commit of an unprepared branch"
                resource = "committed"
            elif isinstance(effect, AbortBranch):
                assert resource != "committed", "rule 4: a committed branch was rolled back"
                resource = "aborted" if resource == "prepared" else resource
            elif isinstance(effect, Send) and isinstance(effect.message, Vote):
                if effect.message.vote is VoteKind.YES:
                    assert prepared_record() in log, "rule 1: YES before a durable PREPARED"
                    voted_yes = True
            elif isinstance(effect, Send) and isinstance(effect.message, Ack):
                committed = BranchCompleted(tx_id=TX, participant=ME, decision=Decision.COMMIT)
                assert resource == "committed" and committed in log, "rule 6"
