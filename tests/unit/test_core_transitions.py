"""Every (state, event kind) pair of both cores: the next state and the effects, as a table.

The tables below are the protocol written out: reading one row tells what a core does when that
event meets a transaction (or branch) in that state. Pairs outside ``TRANSITIONS`` must yield a
single ProtocolViolation and change nothing; the two "contradiction" pairs of the participant
(COMMIT for an aborted branch, ABORT for a committed one) are in the table and report one too.
"""

from __future__ import annotations

import pytest

from coordinator.core import EVENT_KINDS as COORDINATOR_KINDS
from coordinator.core import TRANSITIONS as COORDINATOR_TABLE
from coordinator.core import CoordinatorCore, HistoryLoaded, TxState, Unroutable
from participant.core import EVENT_KINDS as PARTICIPANT_KINDS
from participant.core import TRANSITIONS as PARTICIPANT_TABLE
from participant.core import BranchExecuted, BranchState, ParticipantCore
from schemas.effects import Incoming, ProtocolViolation, TimerFired
from schemas.messages import (
    Abort,
    Ack,
    Begin,
    Branch,
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

NOW = 1_000_000

# ---- the coordinator: transaction "t" with participants a and b -----------------------------


def coordinator_in(state: TxState) -> CoordinatorCore:
    core = CoordinatorCore(started_ms=NOW)
    for p in ("a", "b"):
        core.handle(Incoming(Heartbeat(participant=p, sent_at_ms=NOW, interval_ms=1000)), NOW)
    if state is TxState.NONE:
        return core
    begin = Begin(
        tx_id="t", branches=(Branch("a", "op"), Branch("b", "op")), timeout_ms=1000, reply_to="r"
    )
    core.handle(Incoming(begin), NOW)
    if state is TxState.LOOKING_UP:
        return core
    core.handle(HistoryLoaded("t", []), NOW)
    if state is TxState.VOTING:
        return core
    for p in ("a", "b"):
        core.handle(Incoming(Vote(tx_id="t", participant=p, vote=VoteKind.YES)), NOW)
    return core


def coordinator_event(kind: str) -> object:
    return {
        "Begin": Incoming(
            Begin(
                tx_id="t",
                branches=(Branch("a", "op"), Branch("b", "op")),
                timeout_ms=1000,
                reply_to="r2",
            )
        ),
        "StatusQuery": Incoming(StatusQuery(tx_id="t", reply_to="r3")),
        "HistoryLoaded": HistoryLoaded("t", []),
        "Vote": Incoming(Vote(tx_id="t", participant="a", vote=VoteKind.YES)),
        "Ack": Incoming(Ack(tx_id="t", participant="a")),
        "Inquire": Incoming(Inquire(tx_id="t", participant="a")),
        "Timer:vote": TimerFired(("vote", "t")),
        "Timer:resend": TimerFired(("resend", "t")),
        "Unroutable": Unroutable("t", "a"),
        "Prepare": Incoming(
            Prepare(
                tx_id="t",
                participant="a",
                operation="op",
                args={},
                deadline_ms=NOW,
                participants=("a",),
            )
        ),
        "Commit": Incoming(Commit(tx_id="t", participant="a")),
        "Abort": Incoming(Abort(tx_id="t", participant="a")),
        "Outcome": Incoming(Outcome(tx_id="t", outcome=OutcomeKind.COMMITTED)),
    }[kind]


#: (state, event kind) -> (state after, the effects by type, sorted)
COORDINATOR_EXPECTED: dict[tuple[TxState, str], tuple[str, list[str]]] = {
    (TxState.NONE, "Begin"): ("LOOKING_UP", ["LookUp"]),
    (TxState.NONE, "StatusQuery"): ("LOOKING_UP", ["LookUp"]),
    (TxState.NONE, "HistoryLoaded"): ("NONE", ["ProtocolViolation"]),
    (TxState.NONE, "Vote"): ("LOOKING_UP", ["LookUp"]),
    (TxState.NONE, "Ack"): ("NONE", []),
    (TxState.NONE, "Inquire"): ("LOOKING_UP", ["LookUp"]),
    (TxState.NONE, "Timer:vote"): ("NONE", []),
    (TxState.NONE, "Timer:resend"): ("NONE", []),
    (TxState.NONE, "Unroutable"): ("NONE", []),
    (TxState.NONE, "Prepare"): ("NONE", ["ProtocolViolation"]),
    (TxState.NONE, "Commit"): ("NONE", ["ProtocolViolation"]),
    (TxState.NONE, "Abort"): ("NONE", ["ProtocolViolation"]),
    (TxState.NONE, "Outcome"): ("NONE", ["ProtocolViolation"]),
    (TxState.LOOKING_UP, "Begin"): ("LOOKING_UP", []),
    (TxState.LOOKING_UP, "StatusQuery"): ("LOOKING_UP", []),
    (TxState.LOOKING_UP, "HistoryLoaded"): (
        "VOTING",
        ["Persist:TxBegun", "Send:Prepare", "Send:Prepare", "StartTimer"],
    ),
    (TxState.LOOKING_UP, "Vote"): ("LOOKING_UP", []),
    (TxState.LOOKING_UP, "Ack"): ("LOOKING_UP", []),
    (TxState.LOOKING_UP, "Inquire"): ("LOOKING_UP", []),
    (TxState.LOOKING_UP, "Timer:vote"): ("LOOKING_UP", []),
    (TxState.LOOKING_UP, "Timer:resend"): ("LOOKING_UP", []),
    (TxState.LOOKING_UP, "Unroutable"): ("LOOKING_UP", []),
    (TxState.LOOKING_UP, "Prepare"): ("LOOKING_UP", ["ProtocolViolation"]),
    (TxState.LOOKING_UP, "Commit"): ("LOOKING_UP", ["ProtocolViolation"]),
    (TxState.LOOKING_UP, "Abort"): ("LOOKING_UP", ["ProtocolViolation"]),
    (TxState.LOOKING_UP, "Outcome"): ("LOOKING_UP", ["ProtocolViolation"]),
    (TxState.VOTING, "Begin"): ("VOTING", []),
    (TxState.VOTING, "StatusQuery"): ("VOTING", ["Send:Outcome"]),
    (TxState.VOTING, "HistoryLoaded"): ("VOTING", ["ProtocolViolation"]),
    (TxState.VOTING, "Vote"): ("VOTING", []),
    (TxState.VOTING, "Ack"): ("VOTING", []),
    (TxState.VOTING, "Inquire"): ("VOTING", ["Send:Outcome"]),
    (TxState.VOTING, "Timer:vote"): (
        "NONE",
        ["CancelTimer", "Forget", "Persist:TxAborted", "Send:Abort", "Send:Abort", "Send:Outcome"],
    ),
    (TxState.VOTING, "Timer:resend"): ("VOTING", []),
    (TxState.VOTING, "Unroutable"): (
        "NONE",
        ["CancelTimer", "Forget", "Persist:TxAborted", "Send:Abort", "Send:Abort", "Send:Outcome"],
    ),
    (TxState.VOTING, "Prepare"): ("VOTING", ["ProtocolViolation"]),
    (TxState.VOTING, "Commit"): ("VOTING", ["ProtocolViolation"]),
    (TxState.VOTING, "Abort"): ("VOTING", ["ProtocolViolation"]),
    (TxState.VOTING, "Outcome"): ("VOTING", ["ProtocolViolation"]),
    (TxState.COMMITTING, "Begin"): ("COMMITTING", ["Send:Outcome"]),
    (TxState.COMMITTING, "StatusQuery"): ("COMMITTING", ["Send:Outcome"]),
    (TxState.COMMITTING, "HistoryLoaded"): ("COMMITTING", ["ProtocolViolation"]),
    (TxState.COMMITTING, "Vote"): ("COMMITTING", ["Send:Commit"]),
    (TxState.COMMITTING, "Ack"): ("COMMITTING", []),
    (TxState.COMMITTING, "Inquire"): ("COMMITTING", ["Send:Commit"]),
    (TxState.COMMITTING, "Timer:vote"): ("COMMITTING", []),
    (TxState.COMMITTING, "Timer:resend"): (
        "COMMITTING",
        ["Send:Commit", "Send:Commit", "StartTimer"],
    ),
    (TxState.COMMITTING, "Unroutable"): ("COMMITTING", []),
    (TxState.COMMITTING, "Prepare"): ("COMMITTING", ["ProtocolViolation"]),
    (TxState.COMMITTING, "Commit"): ("COMMITTING", ["ProtocolViolation"]),
    (TxState.COMMITTING, "Abort"): ("COMMITTING", ["ProtocolViolation"]),
    (TxState.COMMITTING, "Outcome"): ("COMMITTING", ["ProtocolViolation"]),
}

# ---- a participant "a": branch "t" ------------------------------------------------------------


def prepare() -> Prepare:
    return Prepare(
        tx_id="t",
        participant="a",
        operation="op",
        args={},
        deadline_ms=NOW + 5000,
        participants=("a", "b"),
    )


def participant_in(state: BranchState) -> ParticipantCore:
    core = ParticipantCore("a")
    if state is BranchState.NONE:
        return core
    core.handle(Incoming(prepare()), NOW)
    if state is BranchState.EXECUTING:
        return core
    if state is BranchState.ABORTED:
        core.handle(BranchExecuted("t", ok=False, reason="no"), NOW)
        return core
    core.handle(BranchExecuted("t", ok=True), NOW)
    if state is BranchState.PREPARED:
        return core
    core.handle(Incoming(Commit(tx_id="t", participant="a")), NOW)
    return core


def participant_event(kind: str) -> object:
    return {
        "Prepare": Incoming(prepare()),
        "BranchExecuted": BranchExecuted("t", ok=True),
        "Commit": Incoming(Commit(tx_id="t", participant="a")),
        "Abort": Incoming(Abort(tx_id="t", participant="a")),
        "Outcome": Incoming(Outcome(tx_id="t", outcome=OutcomeKind.PENDING)),
        "Timer:inquire": TimerFired(("inquire", "t")),
        "Timer:forget": TimerFired(("forget", "t")),
        "Begin": Incoming(
            Begin(tx_id="t", branches=(Branch("a", "op"),), timeout_ms=1000, reply_to="r")
        ),
        "Vote": Incoming(Vote(tx_id="t", participant="a", vote=VoteKind.YES)),
        "Ack": Incoming(Ack(tx_id="t", participant="a")),
        "Inquire": Incoming(Inquire(tx_id="t", participant="a")),
        "Heartbeat": Incoming(Heartbeat(participant="a", sent_at_ms=NOW, interval_ms=1)),
        "StatusQuery": Incoming(StatusQuery(tx_id="t", reply_to="r")),
    }[kind]


PARTICIPANT_EXPECTED: dict[tuple[BranchState, str], tuple[str, list[str]]] = {
    (BranchState.NONE, "Prepare"): ("EXECUTING", ["ExecuteBranch"]),
    (BranchState.NONE, "BranchExecuted"): ("NONE", ["ProtocolViolation"]),
    (BranchState.NONE, "Commit"): ("NONE", ["Send:Ack"]),
    (BranchState.NONE, "Abort"): ("ABORTED", ["Persist:BranchCompleted", "StartTimer"]),
    (BranchState.NONE, "Outcome"): ("NONE", []),
    (BranchState.NONE, "Timer:inquire"): ("NONE", []),
    (BranchState.NONE, "Timer:forget"): ("NONE", []),
    (BranchState.NONE, "Begin"): ("NONE", ["ProtocolViolation"]),
    (BranchState.NONE, "Vote"): ("NONE", ["ProtocolViolation"]),
    (BranchState.NONE, "Ack"): ("NONE", ["ProtocolViolation"]),
    (BranchState.NONE, "Inquire"): ("NONE", ["ProtocolViolation"]),
    (BranchState.NONE, "Heartbeat"): ("NONE", ["ProtocolViolation"]),
    (BranchState.NONE, "StatusQuery"): ("NONE", ["ProtocolViolation"]),
    (BranchState.EXECUTING, "Prepare"): ("EXECUTING", []),
    (BranchState.EXECUTING, "BranchExecuted"): (
        "PREPARED",
        ["Persist:BranchPrepared", "Send:Vote", "StartTimer"],
    ),
    (BranchState.EXECUTING, "Commit"): ("EXECUTING", ["ProtocolViolation"]),
    (BranchState.EXECUTING, "Abort"): ("EXECUTING", []),
    (BranchState.EXECUTING, "Outcome"): ("EXECUTING", []),
    (BranchState.EXECUTING, "Timer:inquire"): ("EXECUTING", []),
    (BranchState.EXECUTING, "Timer:forget"): ("EXECUTING", []),
    (BranchState.EXECUTING, "Begin"): ("EXECUTING", ["ProtocolViolation"]),
    (BranchState.EXECUTING, "Vote"): ("EXECUTING", ["ProtocolViolation"]),
    (BranchState.EXECUTING, "Ack"): ("EXECUTING", ["ProtocolViolation"]),
    (BranchState.EXECUTING, "Inquire"): ("EXECUTING", ["ProtocolViolation"]),
    (BranchState.EXECUTING, "Heartbeat"): ("EXECUTING", ["ProtocolViolation"]),
    (BranchState.EXECUTING, "StatusQuery"): ("EXECUTING", ["ProtocolViolation"]),
    (BranchState.PREPARED, "Prepare"): ("PREPARED", ["Send:Vote"]),
    (BranchState.PREPARED, "BranchExecuted"): ("PREPARED", ["ProtocolViolation"]),
    (BranchState.PREPARED, "Commit"): (
        "COMMITTED",
        ["CancelTimer", "CommitBranch", "Persist:BranchCompleted", "Send:Ack", "StartTimer"],
    ),
    (BranchState.PREPARED, "Abort"): (
        "ABORTED",
        ["AbortBranch", "CancelTimer", "Persist:BranchCompleted", "StartTimer"],
    ),
    (BranchState.PREPARED, "Outcome"): ("PREPARED", []),
    (BranchState.PREPARED, "Timer:inquire"): ("PREPARED", ["Send:Inquire", "StartTimer"]),
    (BranchState.PREPARED, "Timer:forget"): ("PREPARED", []),
    (BranchState.PREPARED, "Begin"): ("PREPARED", ["ProtocolViolation"]),
    (BranchState.PREPARED, "Vote"): ("PREPARED", ["ProtocolViolation"]),
    (BranchState.PREPARED, "Ack"): ("PREPARED", ["ProtocolViolation"]),
    (BranchState.PREPARED, "Inquire"): ("PREPARED", ["ProtocolViolation"]),
    (BranchState.PREPARED, "Heartbeat"): ("PREPARED", ["ProtocolViolation"]),
    (BranchState.PREPARED, "StatusQuery"): ("PREPARED", ["ProtocolViolation"]),
    (BranchState.COMMITTED, "Prepare"): ("COMMITTED", []),
    (BranchState.COMMITTED, "BranchExecuted"): ("COMMITTED", ["ProtocolViolation"]),
    (BranchState.COMMITTED, "Commit"): ("COMMITTED", ["Send:Ack"]),
    (BranchState.COMMITTED, "Abort"): ("COMMITTED", ["ProtocolViolation"]),
    (BranchState.COMMITTED, "Outcome"): ("COMMITTED", []),
    (BranchState.COMMITTED, "Timer:inquire"): ("COMMITTED", []),
    (BranchState.COMMITTED, "Timer:forget"): ("NONE", ["Forget"]),
    (BranchState.COMMITTED, "Begin"): ("COMMITTED", ["ProtocolViolation"]),
    (BranchState.COMMITTED, "Vote"): ("COMMITTED", ["ProtocolViolation"]),
    (BranchState.COMMITTED, "Ack"): ("COMMITTED", ["ProtocolViolation"]),
    (BranchState.COMMITTED, "Inquire"): ("COMMITTED", ["ProtocolViolation"]),
    (BranchState.COMMITTED, "Heartbeat"): ("COMMITTED", ["ProtocolViolation"]),
    (BranchState.COMMITTED, "StatusQuery"): ("COMMITTED", ["ProtocolViolation"]),
    (BranchState.ABORTED, "Prepare"): ("ABORTED", ["Send:Vote"]),
    (BranchState.ABORTED, "BranchExecuted"): ("ABORTED", ["ProtocolViolation"]),
    (BranchState.ABORTED, "Commit"): ("ABORTED", ["ProtocolViolation"]),
    (BranchState.ABORTED, "Abort"): ("ABORTED", []),
    (BranchState.ABORTED, "Outcome"): ("ABORTED", []),
    (BranchState.ABORTED, "Timer:inquire"): ("ABORTED", []),
    (BranchState.ABORTED, "Timer:forget"): ("NONE", ["Forget"]),
    (BranchState.ABORTED, "Begin"): ("ABORTED", ["ProtocolViolation"]),
    (BranchState.ABORTED, "Vote"): ("ABORTED", ["ProtocolViolation"]),
    (BranchState.ABORTED, "Ack"): ("ABORTED", ["ProtocolViolation"]),
    (BranchState.ABORTED, "Inquire"): ("ABORTED", ["ProtocolViolation"]),
    (BranchState.ABORTED, "Heartbeat"): ("ABORTED", ["ProtocolViolation"]),
    (BranchState.ABORTED, "StatusQuery"): ("ABORTED", ["ProtocolViolation"]),
}

#: in the table, yet reported: a decision that contradicts the branch's terminal state
CONTRADICTIONS = {(BranchState.COMMITTED, "Abort"), (BranchState.ABORTED, "Commit")}


def signature(effects: list[object]) -> list[str]:
    names = []
    for effect in effects:
        name = type(effect).__name__
        for inner in ("message", "record"):
            if hasattr(effect, inner):
                name += ":" + type(getattr(effect, inner)).__name__
        names.append(name)
    return sorted(names)


def test_the_tables_cover_every_pair() -> None:
    assert set(COORDINATOR_EXPECTED) == {(s, k) for s in TxState for k in COORDINATOR_KINDS}
    assert set(PARTICIPANT_EXPECTED) == {(s, k) for s in BranchState for k in PARTICIPANT_KINDS}
    assert set(COORDINATOR_TABLE) <= set(COORDINATOR_EXPECTED)
    assert set(PARTICIPANT_TABLE) <= set(PARTICIPANT_EXPECTED)


@pytest.mark.parametrize("pair", sorted(COORDINATOR_EXPECTED, key=str), ids=str)
def test_coordinator_pair(pair: tuple[TxState, str]) -> None:
    state, kind = pair
    core = coordinator_in(state)
    assert core.state_of("t") is state
    before = repr(core.transactions)
    effects = core.handle(coordinator_event(kind), NOW + 1)  # type: ignore[arg-type]
    violations = [e for e in effects if isinstance(e, ProtocolViolation)]
    if pair in COORDINATOR_TABLE:
        assert not violations
    else:
        assert effects == violations and len(violations) == 1
        assert repr(core.transactions) == before  # nothing changed
    assert (core.state_of("t").name, signature(effects)) == COORDINATOR_EXPECTED[pair]


@pytest.mark.parametrize("pair", sorted(PARTICIPANT_EXPECTED, key=str), ids=str)
def test_participant_pair(pair: tuple[BranchState, str]) -> None:
    state, kind = pair
    core = participant_in(state)
    assert core.state_of("t") is state
    before = repr(core.branches)
    effects = core.handle(participant_event(kind), NOW + 1)  # type: ignore[arg-type]
    violations = [e for e in effects if isinstance(e, ProtocolViolation)]
    if pair in PARTICIPANT_TABLE and pair not in CONTRADICTIONS:
        assert not violations
    else:
        assert effects == violations and len(violations) == 1
        assert repr(core.branches) == before  # nothing changed
    assert (core.state_of("t").name, signature(effects)) == PARTICIPANT_EXPECTED[pair]


# ---- the write-ahead order inside one effect list -------------------------------------------


def first_index(effects: list[object], wanted: type, inner: type) -> int:
    for i, effect in enumerate(effects):
        if isinstance(effect, wanted) and isinstance(
            getattr(effect, "message", getattr(effect, "record", None)), inner
        ):
            return i
    raise AssertionError(f"no {wanted.__name__} of {inner.__name__} in {effects}")


def test_the_last_yes_vote_forces_the_commit_record_before_any_commit_or_answer() -> None:
    from schemas.effects import Persist, Send
    from schemas.records import TxCommitting

    core = coordinator_in(TxState.VOTING)
    assert core.handle(Incoming(Vote(tx_id="t", participant="a", vote=VoteKind.YES)), NOW) == []
    effects = core.handle(Incoming(Vote(tx_id="t", participant="b", vote=VoteKind.YES)), NOW)
    decision = first_index(effects, Persist, TxCommitting)
    assert effects[decision].force  # type: ignore[attr-defined]
    sends = [i for i, e in enumerate(effects) if isinstance(e, Send)]
    assert len(sends) == 3 and min(sends) > decision  # two COMMITs and the client's answer


def test_a_yes_vote_leaves_after_its_forced_prepared_record() -> None:
    from schemas.effects import Persist, Send
    from schemas.records import BranchPrepared

    effects = participant_in(BranchState.EXECUTING).handle(BranchExecuted("t", ok=True), NOW)
    record = first_index(effects, Persist, BranchPrepared)
    assert effects[record].force  # type: ignore[attr-defined]
    assert first_index(effects, Send, Vote) > record


def test_an_ack_leaves_after_the_commit_and_its_forced_record() -> None:
    from participant.core import CommitBranch
    from schemas.effects import Persist, Send
    from schemas.records import BranchCompleted

    core = participant_in(BranchState.PREPARED)
    effects = core.handle(Incoming(Commit(tx_id="t", participant="a")), NOW)
    commit = next(i for i, e in enumerate(effects) if isinstance(e, CommitBranch))
    record = first_index(effects, Persist, BranchCompleted)
    assert effects[record].force  # type: ignore[attr-defined]
    assert commit < record < first_index(effects, Send, Ack)


def test_a_no_vote_aborts_naming_the_voter_who_gets_no_abort() -> None:
    from schemas.effects import Send

    core = coordinator_in(TxState.VOTING)
    no = Vote(tx_id="t", participant="a", vote=VoteKind.NO, reason="insufficient funds")
    effects = core.handle(Incoming(no), NOW)
    aborts = [e.message for e in effects if isinstance(e, Send) and isinstance(e.message, Abort)]
    assert [a.participant for a in aborts] == ["b"]
    (answer,) = [
        e.message for e in effects if isinstance(e, Send) and isinstance(e.message, Outcome)
    ]
    assert answer.outcome is OutcomeKind.ABORTED and answer.at_fault == "a"
    assert "insufficient funds" in answer.reason
