"""The coordinator's core, pair by pair and rule by rule.

Every (state, event kind) pair is driven from a real core put into that state. Pairs outside
``TRANSITIONS`` must produce exactly one ProtocolViolation and change nothing; pairs inside must
produce exactly the effects written in ``EXPECTED`` (in order: the order is the write-ahead
contract with the driver) and leave the transaction in the state written there.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core import (
    EVENT_KINDS,
    TRANSITIONS,
    CoordinatorCore,
    CoordinatorSettings,
    HistoryLoaded,
    LookUp,
    Recovered,
    TxState,
    Unroutable,
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
from schemas.records import CoordinatorRecord, TxAborted, TxBegun, TxCommitting, TxEnded

NOW = 1_000_000
TX = "t"
CLIENT = topology.client_queue("c1")
SETTINGS = CoordinatorSettings(liveness_timeout_ms=3_000, resend_initial_ms=500)


def begin(
    *participants: str, tx: str = TX, timeout_ms: int = 1_000, reply_to: str = CLIENT
) -> Begin:
    branches = tuple(Branch(p, "op", {"p": p}) for p in participants)
    return Begin(tx_id=tx, branches=branches, timeout_ms=timeout_ms, reply_to=reply_to)


def vote(participant: str, kind: VoteKind = VoteKind.YES, reason: str = "") -> Incoming:
    return Incoming(Vote(tx_id=TX, participant=participant, vote=kind, reason=reason))


def fresh(*alive: str, now: int = NOW) -> CoordinatorCore:
    core = CoordinatorCore(SETTINGS, started_ms=now - 60_000)  # long after the start-up grace
    for p in alive:
        core.handle(Incoming(Heartbeat(participant=p, sent_at_ms=now, interval_ms=1_000)), now)
    return core


def started(*participants: str) -> CoordinatorCore:
    """Transaction ``TX`` collecting votes from ``participants``."""
    core = fresh(*participants)
    assert core.handle(Incoming(begin(*participants)), NOW) == [LookUp(TX)]
    core.handle(HistoryLoaded(TX, []), NOW)
    assert core.state_of(TX) is TxState.VOTING
    return core


def coordinator_in(state: TxState) -> CoordinatorCore:
    """Transaction ``TX`` over participants a and b, in ``state``."""
    if state is TxState.NONE:
        return fresh("a", "b")
    if state is TxState.LOOKING_UP:
        core = fresh("a", "b")
        core.handle(Incoming(begin("a", "b")), NOW)
        return core
    if state is TxState.RESOLVING:  # one phase: a's vote did not come in time
        core = started("a")
        core.handle(TimerFired(("vote", TX)), NOW)
        assert core.state_of(TX) is state
        return core
    core = started("a", "b")
    if state is TxState.COMMITTING:
        core.handle(vote("a"), NOW)
        core.handle(vote("b"), NOW)
    assert core.state_of(TX) is state
    return core


EVENTS: dict[str, Any] = {
    "Begin": Incoming(begin("a", "b", reply_to=topology.client_queue("c2"))),
    "StatusQuery": Incoming(StatusQuery(tx_id=TX, reply_to=topology.client_queue("s"))),
    "HistoryLoaded": HistoryLoaded(TX, []),
    "Vote": vote("a"),
    "Ack": Incoming(Ack(tx_id=TX, participant="a")),
    "Inquire": Incoming(Inquire(tx_id=TX, participant="a")),
    "Timer:vote": TimerFired(("vote", TX)),
    "Timer:resend": TimerFired(("resend", TX)),
    "Unroutable": Unroutable(TX, "b"),
    "Prepare": Incoming(
        Prepare(
            tx_id=TX, participant="a", operation="op", args={}, deadline_ms=NOW, participants=()
        )
    ),
    "Commit": Incoming(Commit(tx_id=TX, participant="a")),
    "Abort": Incoming(Abort(tx_id=TX, participant="a")),
    "Outcome": Incoming(Outcome(tx_id=TX, outcome=OutcomeKind.COMMITTED)),
}


def sig(effect: Any) -> str:
    """A compact, exact description: ``Persist(aborted!)`` is forced, ``Commit>a`` is a COMMIT
    to participant a, ``Outcome.aborted>c1`` an answer to client c1."""
    if isinstance(effect, Persist):
        return f"Persist({type(effect.record).__struct_config__.tag}{'!' if effect.force else ''})"
    if isinstance(effect, Send):
        dest = effect.queue.rsplit(".", 1)[-1]
        m = effect.message
        kind = type(m).__name__
        if isinstance(m, Outcome):
            kind += f".{m.outcome.value}"
        elif isinstance(m, Vote):
            kind += f".{m.vote.value}"
        return f"{kind}>{dest}"
    if isinstance(effect, StartTimer | CancelTimer):
        return f"{type(effect).__name__}({effect.key[0]})"
    return type(effect).__name__


N, L, V, K = TxState.NONE, TxState.LOOKING_UP, TxState.VOTING, TxState.COMMITTING
Q = TxState.RESOLVING
ABORT_ALL = [
    "Persist(aborted!)",
    "CancelTimer(vote)",
    "Abort>a",
    "Abort>b",
    "Outcome.aborted>c1",
    "Forget",
]

#: (state, event kind) -> (state after, the effects in order) for every pair in the table
EXPECTED: dict[tuple[TxState, str], tuple[TxState, list[str]]] = {
    (N, "Begin"): (L, ["LookUp"]),
    (L, "Begin"): (L, []),  # joins the look-up; answered with the first
    (V, "Begin"): (V, []),  # joins: told the outcome with the first client
    (K, "Begin"): (K, ["Outcome.committed>c2"]),
    (N, "StatusQuery"): (L, ["LookUp"]),
    (L, "StatusQuery"): (L, []),
    (V, "StatusQuery"): (V, ["Outcome.pending>s"]),
    (K, "StatusQuery"): (K, ["Outcome.committed>s"]),
    (L, "HistoryLoaded"): (
        V,
        ["Persist(begun)", "Prepare>a", "Prepare>b", "StartTimer(vote)"],
    ),
    (N, "Vote"): (L, ["LookUp"]),  # a late YES is answered from the log
    (L, "Vote"): (L, []),  # ... once it is read
    (V, "Vote"): (V, []),  # one of two votes
    (K, "Vote"): (K, ["Commit>a"]),  # a duplicate YES: that participant missed its COMMIT
    (N, "Ack"): (N, []),
    (L, "Ack"): (L, []),
    (V, "Ack"): (V, []),
    (K, "Ack"): (K, []),  # b has not ACKed yet
    (N, "Inquire"): (L, ["LookUp"]),
    (L, "Inquire"): (L, []),
    (V, "Inquire"): (V, []),
    (K, "Inquire"): (K, ["Commit>a"]),
    (N, "Timer:vote"): (N, []),
    (L, "Timer:vote"): (L, []),
    (V, "Timer:vote"): (N, ABORT_ALL),
    (K, "Timer:vote"): (K, []),
    (N, "Timer:resend"): (N, []),
    (L, "Timer:resend"): (L, []),
    (V, "Timer:resend"): (V, []),
    (K, "Timer:resend"): (K, ["Commit>a", "Commit>b", "StartTimer(resend)"]),
    (N, "Unroutable"): (N, []),
    (L, "Unroutable"): (L, []),
    (V, "Unroutable"): (N, ABORT_ALL),
    (K, "Unroutable"): (K, []),
    (Q, "Begin"): (Q, []),  # told when a answers
    (Q, "StatusQuery"): (Q, ["Outcome.pending>s"]),
    (Q, "Vote"): (Q, []),  # a YES sent before a heard the question; its answer follows
    (Q, "Ack"): (Q, []),
    (Q, "Inquire"): (Q, ["Abort>a"]),  # a declined one phase and is in doubt: the question
    (Q, "Timer:vote"): (Q, []),
    (Q, "Timer:resend"): (Q, ["Abort>a", "StartTimer(resend)"]),
    (Q, "Unroutable"): (Q, []),
}

PAIRS = [(state, kind) for state in TxState for kind in EVENT_KINDS]


def test_the_expectations_are_the_table() -> None:
    assert set(EXPECTED) == set(TRANSITIONS)
    assert set(TRANSITIONS) <= set(PAIRS)


@pytest.mark.parametrize(("state", "kind"), PAIRS, ids=[f"{s.name}-{k}" for s, k in PAIRS])
def test_every_state_meets_every_event(state: TxState, kind: str) -> None:
    core = coordinator_in(state)
    before = copy.deepcopy(vars(core))
    effects = core.handle(EVENTS[kind], NOW)
    if (state, kind) not in TRANSITIONS:
        assert len(effects) == 1
        assert isinstance(effects[0], ProtocolViolation)
        assert effects[0].tx_id == TX
        assert kind in effects[0].description
        assert vars(core) == before, "a rejected event changed the core"
        return
    after, expected = EXPECTED[state, kind]
    assert [sig(e) for e in effects] == expected
    assert core.state_of(TX) is after


def test_heartbeats_and_recovery_are_outside_the_table() -> None:
    core = fresh()
    beat = Heartbeat(participant="a", sent_at_ms=NOW, interval_ms=1_000)
    assert core.handle(Incoming(beat), NOW) == []
    assert core.participant_status("a", NOW) == "up"
    assert core.handle(Recovered({}), NOW) == []


# ---- the commit decision ----------------------------------------------------------------------


def _index(effects: list[Any], predicate: Any) -> list[int]:
    return [i for i, e in enumerate(effects) if predicate(e)]


def test_commit_leaves_only_after_the_forced_committing_record() -> None:
    core = started("a", "b")
    assert core.handle(vote("b"), NOW) == []
    effects = core.handle(vote("a"), NOW)
    assert [sig(e) for e in effects] == [
        "Persist(committing!)",
        "CancelTimer(vote)",
        "Commit>a",
        "Commit>b",
        "Outcome.committed>c1",
        "StartTimer(resend)",
    ]
    record = effects[0]
    assert isinstance(record, Persist) and isinstance(record.record, TxCommitting)
    assert record.record.participants == ("a", "b")
    assert record.record.reply_to == (CLIENT,)


@settings(max_examples=200, deadline=None)
@given(
    votes=st.lists(st.sampled_from([VoteKind.YES, VoteKind.READ_ONLY]), min_size=1, max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_any_unanimous_vote_forces_committing_before_any_commit_or_answer(
    votes: list[VoteKind], order: Any
) -> None:
    participants = [f"p{i}" for i in range(len(votes))]
    core = started(*participants)
    arrivals = list(zip(participants, votes, strict=True))
    order.shuffle(arrivals)
    effects: list[Any] = []
    for p, kind in arrivals:
        effects += core.handle(vote(p, kind), NOW)
    forced = _index(effects, lambda e: isinstance(e, Persist) and e.force)
    commits = _index(effects, lambda e: isinstance(e, Send) and isinstance(e.message, Commit))
    answers = _index(effects, lambda e: isinstance(e, Send) and isinstance(e.message, Outcome))
    committing = [e.record for e in effects if isinstance(e, Persist)]
    assert isinstance(committing[0], TxCommitting)
    assert forced[0] < min(commits + answers)
    yes = {p for p, kind in arrivals if kind is VoteKind.YES}
    assert set(committing[0].participants) == yes
    # read-only voters get no COMMIT and are not waited for
    assert {
        e.message.participant
        for e in effects
        if isinstance(e, Send) and isinstance(e.message, Commit)
    } == yes
    if not yes:  # no phase two at all
        assert [sig(e) for e in effects[-2:]] == ["Persist(ended)", "Forget"]
        assert core.state_of(TX) is TxState.NONE
    else:
        assert core.state_of(TX) is TxState.COMMITTING


def test_the_last_ack_ends_the_transaction_lazily() -> None:
    core = coordinator_in(K)
    assert core.handle(Incoming(Ack(tx_id=TX, participant="a")), NOW) == []
    assert core.handle(Incoming(Ack(tx_id=TX, participant="a")), NOW) == []  # duplicate
    effects = core.handle(Incoming(Ack(tx_id=TX, participant="b")), NOW)
    assert [sig(e) for e in effects] == ["CancelTimer(resend)", "Persist(ended)", "Forget"]
    assert core.state_of(TX) is TxState.NONE


def test_commit_resend_backs_off_doubling_up_to_the_maximum() -> None:
    core = CoordinatorCore(
        CoordinatorSettings(resend_initial_ms=500, resend_max_ms=3_000), started_ms=NOW
    )
    core.handle(Incoming(begin("a")), NOW)
    core.handle(HistoryLoaded(TX, []), NOW)
    first = core.handle(vote("a"), NOW)[-1]
    assert first == StartTimer(("resend", TX), NOW + 500)
    now, delays = NOW + 500, []
    for _ in range(6):
        effects = core.handle(TimerFired(("resend", TX)), now)
        assert [sig(e) for e in effects] == ["Commit>a", "StartTimer(resend)"]
        timer = effects[-1]
        assert isinstance(timer, StartTimer)
        delays.append(timer.deadline_ms - now)
        now = timer.deadline_ms
    assert delays == [500, 1_000, 2_000, 3_000, 3_000, 3_000]


# ---- aborts -----------------------------------------------------------------------------------


def _outcome(effects: list[Any], queue: str = CLIENT) -> Outcome:
    (answer,) = [e.message for e in effects if isinstance(e, Send) and e.queue == queue]
    assert isinstance(answer, Outcome)
    return answer


def _aborts_to(effects: list[Any]) -> list[str]:
    return [
        e.message.participant
        for e in effects
        if isinstance(e, Send) and isinstance(e.message, Abort)
    ]


def test_a_vote_timeout_aborts_naming_the_silent_participants() -> None:
    core = started("a", "b", "c")
    core.handle(vote("b"), NOW)
    effects = core.handle(TimerFired(("vote", TX)), NOW + 1_000)
    record = effects[0]
    assert isinstance(record, Persist) and record.force and isinstance(record.record, TxAborted)
    answer = _outcome(effects)
    assert answer.outcome is OutcomeKind.ABORTED
    assert answer.at_fault == "a" == record.record.at_fault
    assert "no vote from a, c within 1000 ms" in answer.reason
    assert _aborts_to(effects) == ["a", "b", "c"]  # b voted YES and holds a prepared branch
    assert core.state_of(TX) is TxState.NONE


def test_a_no_vote_aborts_naming_the_voter_who_gets_no_abort() -> None:
    core = started("a", "b", "c")
    core.handle(vote("a", VoteKind.READ_ONLY), NOW)
    effects = core.handle(vote("b", VoteKind.NO, "insufficient funds"), NOW)
    assert sig(effects[0]) == "Persist(aborted!)"
    answer = _outcome(effects)
    assert answer.at_fault == "b"
    assert answer.reason == "b voted NO: insufficient funds"
    # the NO voter and the read-only voter have nothing to roll back
    assert _aborts_to(effects) == ["c"]


def test_an_unroutable_prepare_aborts_naming_the_participant() -> None:
    core = started("a", "ghost")
    effects = core.handle(Unroutable(TX, "ghost"), NOW)
    answer = _outcome(effects)
    assert answer.at_fault == "ghost"
    assert "unknown participant 'ghost'" in answer.reason
    assert core.handle(Unroutable(TX, "ghost"), NOW) == []  # already finished


def test_status_queries_waiting_for_the_log_hear_the_abort() -> None:
    core = fresh("a")
    status = topology.client_queue("s")
    core.handle(Incoming(StatusQuery(tx_id=TX, reply_to=status)), NOW)
    core.handle(Incoming(begin("a")), NOW)  # the Begin joins the status look-up and runs
    effects = core.handle(HistoryLoaded(TX, []), NOW)
    assert "Prepare>a" in [sig(e) for e in effects]
    effects = core.handle(vote("a", VoteKind.NO), NOW)
    assert _outcome(effects, status).outcome is OutcomeKind.ABORTED
    assert _outcome(effects, CLIENT).outcome is OutcomeKind.ABORTED


# ---- refusals at BEGIN ------------------------------------------------------------------------


def _refused(core: CoordinatorCore, message: Begin, now: int = NOW) -> Outcome:
    assert core.handle(Incoming(message), now) == [LookUp(TX)]
    effects = core.handle(HistoryLoaded(TX, []), now)
    assert [sig(e) for e in effects] == ["Persist(aborted!)", "Outcome.aborted>c1", "Forget"]
    assert core.state_of(TX) is TxState.NONE
    return _outcome(effects)


@pytest.mark.parametrize(
    ("message", "at_fault", "reason"),
    [
        (begin("a", "b", "a"), "a", "participant 'a' appears twice"),
        (begin("a", "bad name!"), "bad name!", "invalid participant name 'bad name!'"),
        (begin("a", timeout_ms=1), None, "timeout 1 ms is outside"),
        (begin("a", timeout_ms=10**9), None, "timeout 1000000000 ms is outside"),
        (begin(), None, "the transaction has no branches"),
        (begin("a", "stranger"), "stranger", "unknown participant 'stranger'"),
    ],
    ids=["duplicate", "invalid-name", "timeout-too-short", "timeout-too-long", "empty", "unknown"],
)
def test_a_begin_that_cannot_succeed_is_refused_at_once(
    message: Begin, at_fault: str | None, reason: str
) -> None:
    answer = _refused(fresh("a", "b"), message)
    assert answer.outcome is OutcomeKind.ABORTED
    assert answer.at_fault == at_fault
    assert reason in answer.reason


def test_a_participant_whose_heartbeats_stopped_is_down_and_refused() -> None:
    core = fresh("a", "b")
    later = NOW + SETTINGS.liveness_timeout_ms + 1
    assert core.participant_status("b", later) == "down"
    answer = _refused(core, begin("a", "b"), now=later)
    assert answer.at_fault == "a"  # the first of the branches that is down
    core = fresh("a")
    core.handle(
        Incoming(Heartbeat(participant="b", sent_at_ms=NOW, interval_ms=1_000)), NOW - 5_000
    )
    answer = _refused(core, begin("a", "b"))
    assert answer.at_fault == "b"
    assert "participant 'b' is down" in answer.reason


# ---- resubmission and late messages: the log answers -------------------------------------------


@pytest.mark.parametrize(
    ("records", "outcome"),
    [
        (
            [
                TxBegun(tx_id=TX, branches=(), deadline_ms=0, reply_to=CLIENT),
                TxAborted(tx_id=TX, reason="b voted NO: no", at_fault="b"),
            ],
            Outcome(tx_id=TX, outcome=OutcomeKind.ABORTED, reason="b voted NO: no", at_fault="b"),
        ),
        (
            [TxCommitting(tx_id=TX, participants=("a",)), TxEnded(tx_id=TX)],
            Outcome(tx_id=TX, outcome=OutcomeKind.COMMITTED),
        ),
    ],
    ids=["aborted", "committed"],
)
def test_a_resubmitted_begin_gets_the_recorded_outcome_and_never_prepares(
    records: list[Any], outcome: Outcome
) -> None:
    core = fresh("a", "b")
    assert core.handle(Incoming(begin("a", "b")), NOW) == [LookUp(TX)]
    effects = core.handle(HistoryLoaded(TX, records), NOW)
    assert effects == [Send(CLIENT, outcome)]
    assert core.state_of(TX) is TxState.NONE


def test_a_late_yes_vote_after_end_hears_commit_and_an_unknown_inquiry_abort() -> None:
    core = fresh("a")
    assert core.handle(vote("a"), NOW) == [LookUp(TX)]
    effects = core.handle(
        HistoryLoaded(TX, [TxCommitting(tx_id=TX, participants=("a",)), TxEnded(tx_id=TX)]), NOW
    )
    assert [sig(e) for e in effects] == ["Commit>a"]
    assert core.handle(Incoming(Inquire(tx_id=TX, participant="b")), NOW) == [LookUp(TX)]
    effects = core.handle(HistoryLoaded(TX, []), NOW)  # no decision on record: presumed abort
    assert [sig(e) for e in effects] == ["Abort>b"]
    assert core.state_of(TX) is TxState.NONE


def test_an_inquiry_about_a_begun_undecided_transaction_logs_the_abort_before_telling_anyone() -> (
    None
):
    """The log was read before recovery aborted it (or, with several coordinators, another owner
    began it): the abort is forced to the log first, then every participant hears it, the client
    too, not only the one that asked (docs/architecture.md §12.1, L7)."""
    core = fresh("a", "b")
    assert core.handle(Incoming(Inquire(tx_id=TX, participant="b")), NOW) == [LookUp(TX)]
    branches = (Branch("a", "op"), Branch("b", "op"))
    begun = TxBegun(tx_id=TX, branches=branches, deadline_ms=NOW, reply_to=CLIENT)
    effects = core.handle(HistoryLoaded(TX, [begun]), NOW)
    signatures = [sig(e) for e in effects]
    assert signatures[0] == "Persist(aborted!)"
    assert {"Abort>a", "Abort>b", "Outcome.aborted>c1"} <= set(signatures), signatures
    assert core.state_of(TX) is TxState.NONE


def test_a_late_no_or_read_only_vote_for_an_unknown_transaction_needs_no_answer() -> None:
    core = coordinator_in(TxState.NONE)
    assert core.handle(vote("a", VoteKind.NO), NOW) == []
    assert core.handle(vote("a", VoteKind.READ_ONLY), NOW) == []
    assert core.state_of(TX) is TxState.NONE


def test_an_inquiry_while_voting_is_not_answered_until_the_decision() -> None:
    core = started("a", "b")
    assert core.handle(Incoming(Inquire(tx_id=TX, participant="b")), NOW) == []
    assert core.state_of(TX) is TxState.VOTING


# ---- recovery ---------------------------------------------------------------------------------


def test_recovery_resends_commit_without_end_and_aborts_what_was_undecided() -> None:
    core = CoordinatorCore(SETTINGS, started_ms=NOW)
    branches = (Branch("a", "op"), Branch("b", "op"))
    committing: list[CoordinatorRecord] = [
        TxBegun(tx_id="c", branches=branches, deadline_ms=NOW, reply_to=CLIENT),
        TxCommitting(tx_id="c", participants=("b",)),
    ]
    undecided: list[CoordinatorRecord] = [
        TxBegun(tx_id="u", branches=branches, deadline_ms=NOW, reply_to=CLIENT)
    ]
    effects = core.handle(Recovered({"c": committing, "u": undecided}), NOW)
    assert [sig(e) for e in effects] == [
        "Commit>b",  # only the YES voters recorded in COMMITTING
        "StartTimer(resend)",
        "Persist(aborted!)",
        "CancelTimer(vote)",
        "Abort>a",
        "Abort>b",
        "Outcome.aborted>c1",
        "Forget",
    ]
    assert core.state_of("c") is TxState.COMMITTING
    assert core.state_of("u") is TxState.NONE
    sent_for = [getattr(e.message, "tx_id", "") for e in effects if isinstance(e, Send)]
    assert sent_for == ["c"] + ["u"] * 3
    # the committing transaction ends normally
    effects = core.handle(Incoming(Ack(tx_id="c", participant="b")), NOW)
    assert [sig(e) for e in effects] == ["CancelTimer(resend)", "Persist(ended)", "Forget"]


def test_recovery_with_nothing_unfinished_does_nothing() -> None:
    core = CoordinatorCore(SETTINGS, started_ms=NOW)
    assert core.handle(Recovered({}), NOW) == []
    assert core.in_doubt() == []


# ---- a property over arbitrary event sequences ------------------------------------------------

ANY_EVENT = st.sampled_from(
    [
        vote("a"),
        vote("b"),
        vote("a", VoteKind.NO),
        vote("b", VoteKind.READ_ONLY),
        Incoming(Ack(tx_id=TX, participant="a")),
        Incoming(Ack(tx_id=TX, participant="b")),
        Incoming(Inquire(tx_id=TX, participant="a")),
        Incoming(begin("a", "b")),
        TimerFired(("vote", TX)),
        TimerFired(("resend", TX)),
        Unroutable(TX, "b"),
        "the log is read",  # HistoryLoaded with what was persisted so far
        "restart",  # a crash: a new core recovers from the forced records
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ANY_EVENT, max_size=30))
def test_rules_2_3_4_and_7_hold_over_any_sequence_of_events(events: list[Any]) -> None:
    """Checked on the effects as they are emitted, with a log of the forced records only."""
    core, log, yes = fresh("a", "b"), list[CoordinatorRecord](), set[str]()
    for now, event in enumerate(events, NOW):
        if event == "the log is read":
            event = HistoryLoaded(TX, [r for r in log if r.tx_id == TX])
        elif event == "restart":
            unfinished: list[CoordinatorRecord] = [
                r for r in log if not isinstance(r, TxAborted | TxEnded)
            ]
            finished = len(unfinished) < len(log)
            core = fresh("a", "b", now=now)
            event = Recovered({} if finished or not unfinished else {TX: unfinished})
        elif (
            isinstance(event, Incoming)
            and isinstance(event.message, Vote)
            and event.message.vote is not VoteKind.NO
        ):
            yes.add(event.message.participant)
        for effect in core.handle(event, now):
            if isinstance(effect, Persist):
                if isinstance(effect.record, TxCommitting):
                    assert {"a", "b"} <= yes, "rule 3: COMMITTING without every vote"
                log.append(effect.record)  # type: ignore[arg-type]  # unforced ones too
            committed = isinstance(effect, Send) and (
                isinstance(effect.message, Commit)
                or (
                    isinstance(effect.message, Outcome)
                    and effect.message.outcome is OutcomeKind.COMMITTED
                )
            )
            if committed:
                assert any(isinstance(r, TxCommitting) for r in log), "rules 2 and 7"
        decisions = {type(r) for r in log} & {TxCommitting, TxAborted}
        assert len(decisions) <= 1, "rule 4: the decision changed"
