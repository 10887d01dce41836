"""The coordinator's protocol as a transition table (presumed abort).

``CoordinatorCore.handle(event, now_ms)`` looks the pair (state of the transaction, kind of event)
up in ``TRANSITIONS``; a pair that is not there is a protocol violation, reported as an effect and
never passed over silently. Time comes in as ``now_ms``; ids come in the messages.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from coordinator.core.admission import CoordinatorSettings, Liveness, record_heartbeat, refusal
from coordinator.core.events import Event, HistoryLoaded, LookUp, Recovered, Unroutable
from schemas import topology
from schemas.effects import (
    CancelTimer,
    Forget,
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
from schemas.records import CoordinatorRecord, TxAborted, TxBegun, TxCommitting, TxEnded

Effect = Persist | Send | StartTimer | CancelTimer | Forget | ProtocolViolation | LookUp

M = TypeVar("M")

VOTE_TIMER = "vote"
RESEND_TIMER = "resend"


class TxState(enum.Enum):
    #: not in memory: never seen, finished, or forgotten after a restart
    NONE = "none"
    #: a Begin or status query waits for the log to say whether the tx_id was seen before
    LOOKING_UP = "looking_up"
    VOTING = "voting"
    #: COMMIT is durable; waiting for every YES voter's ACK
    COMMITTING = "committing"
    #: a one-phase vote did not come: Abort(one_phase) is re-sent until the participant says
    #: whether its branch committed (COMMITTED) or never will (NO); nothing is presumed
    RESOLVING = "resolving"


@dataclass
class Transaction:
    tx_id: str
    state: TxState
    begin: Begin | None = None
    traceparent: str = ""
    reply_to: list[str] = field(default_factory=list)
    status_reply_to: list[str] = field(default_factory=list)
    participants: tuple[str, ...] = ()
    votes: dict[str, VoteKind] = field(default_factory=dict)
    awaiting_ack: set[str] = field(default_factory=set)
    resend_delay_ms: int = 0
    #: participants that asked (a late YES vote, an inquiry) while the log is read
    askers: list[str] = field(default_factory=list)
    one_phase: bool = False
    deadline_ms: int = 0
    #: RESOLVING: why the coordinator gave up waiting, and on whom (the outcome if it was NO)
    abort_reason: str = ""
    at_fault: str | None = None


Handler = Callable[["CoordinatorCore", Transaction, Event, int], list[Effect]]


def _kind(event: Event) -> str:
    if isinstance(event, Incoming):
        return type(event.message).__name__
    if isinstance(event, TimerFired):
        return f"Timer:{event.key[0]}"
    return type(event).__name__


class CoordinatorCore:
    def __init__(self, settings: CoordinatorSettings | None = None, *, started_ms: int = 0) -> None:
        self.settings = settings or CoordinatorSettings()
        self.started_ms = started_ms
        self.transactions: dict[str, Transaction] = {}
        self.liveness: dict[str, Liveness] = {}

    # ---- public API --------------------------------------------------------------------------

    def handle(self, event: Event, now_ms: int) -> list[Effect]:
        if isinstance(event, Incoming) and isinstance(event.message, Heartbeat):
            record_heartbeat(self.settings, self.liveness, event.message, now_ms)
            return []
        if isinstance(event, Recovered):
            return self._recover(event, now_ms)
        tx_id = _tx_id(event)
        tx = self.transactions.get(tx_id) or Transaction(tx_id, TxState.NONE)
        handler = TRANSITIONS.get((tx.state, _kind(event)))
        if handler is None:
            return [
                ProtocolViolation(tx_id, f"{_kind(event)} is not valid in state {tx.state.value}")
            ]
        return handler(self, tx, event, now_ms)

    def state_of(self, tx_id: str) -> TxState:
        tx = self.transactions.get(tx_id)
        return tx.state if tx else TxState.NONE

    def in_doubt(self) -> list[str]:
        return [t.tx_id for t in self.transactions.values() if t.state is not TxState.LOOKING_UP]

    def participant_status(self, name: str, now_ms: int) -> str:
        seen = self.liveness.get(name)
        if seen is None:
            return "unknown"
        return "up" if now_ms - seen.last_seen_ms <= self.settings.liveness_timeout_ms else "down"

    def listening_again(self, now_ms: int) -> None:
        """The coordinator heard nothing until ``now_ms`` (its connection was down): as after a
        start, participants get one liveness timeout for a heartbeat before they count as down,
        rather than being refused for a silence that was the coordinator's own."""
        self.started_ms = now_ms

    # ---- transitions -------------------------------------------------------------------------

    def _begin_look_up(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        begin = _message(event, Begin)
        tx.begin = begin
        tx.traceparent = _traceparent(event)
        tx.reply_to.append(begin.reply_to)
        tx.state = TxState.LOOKING_UP
        self.transactions[tx.tx_id] = tx
        return [LookUp(tx.tx_id)]

    def _status_look_up(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        tx.status_reply_to.append(_message(event, StatusQuery).reply_to)
        tx.state = TxState.LOOKING_UP
        self.transactions[tx.tx_id] = tx
        return [LookUp(tx.tx_id)]

    def _join_begin(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        begin = _message(event, Begin)
        reply_to = begin.reply_to
        if tx.state is TxState.LOOKING_UP and tx.begin is None:  # the look-up began for an asker
            tx.begin, tx.traceparent = begin, _traceparent(event)
        if reply_to not in tx.reply_to:
            tx.reply_to.append(reply_to)
        if tx.state is TxState.COMMITTING:
            return [Send(reply_to, Outcome(tx_id=tx.tx_id, outcome=OutcomeKind.COMMITTED))]
        return []

    def _join_status(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        reply_to = _message(event, StatusQuery).reply_to
        if tx.state is TxState.LOOKING_UP:
            tx.status_reply_to.append(reply_to)
            return []
        kind = OutcomeKind.COMMITTED if tx.state is TxState.COMMITTING else OutcomeKind.PENDING
        return [Send(reply_to, Outcome(tx_id=tx.tx_id, outcome=kind))]

    def _history_loaded(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        assert isinstance(event, HistoryLoaded)
        finished = _recorded_outcome(event.records)
        if finished is not None:
            del self.transactions[tx.tx_id]
            effects: list[Effect] = [
                Send(q, finished, tx.traceparent) for q in tx.reply_to + tx.status_reply_to
            ]
            return effects + self._answer_askers(tx, finished.outcome is OutcomeKind.COMMITTED)
        begun = next((r for r in event.records if isinstance(r, TxBegun)), None)
        if begun is not None:
            # Begun by an earlier incarnation (or, with several coordinators, another owner) and
            # not decided: recovery normally aborts these, so the log was read before it
            # finished. Whoever asks (a Begin again, a vote, an inquiry), the abort is logged
            # before anyone hears of it, and every participant of the transaction is told.
            self._restore(tx, begun)
            if begun.one_phase:
                reason = "the coordinator restarted before the one-phase vote arrived"
                return self._resolve(tx, reason, None, now_ms)
            aborted = self._abort(tx, "the coordinator restarted before deciding", None)
            return aborted + self._answer_askers(tx, committed=False)
        if tx.begin is None:  # never begun here: presumed abort, nothing to log
            del self.transactions[tx.tx_id]
            unknown = Outcome(tx_id=tx.tx_id, outcome=OutcomeKind.UNKNOWN)
            effects = [Send(q, unknown) for q in tx.status_reply_to]
            return effects + self._answer_askers(tx, committed=False)
        return self._start(tx, now_ms)

    def _start(self, tx: Transaction, now_ms: int) -> list[Effect]:
        begin = tx.begin
        assert begin is not None
        refused = refusal(self.settings, self.liveness, self.started_ms, begin, now_ms)
        tx.participants = tuple(b.participant for b in begin.branches)
        if refused is not None:
            reason, at_fault = refused
            return self._abort(tx, reason, at_fault, send_aborts=False)
        deadline_ms = tx.deadline_ms = now_ms + begin.timeout_ms
        tx.state = TxState.VOTING
        tx.one_phase = self.settings.one_phase and len(begin.branches) == 1
        effects: list[Effect] = [
            Persist(
                TxBegun(
                    tx_id=tx.tx_id,
                    branches=begin.branches,
                    deadline_ms=deadline_ms,
                    reply_to=begin.reply_to,
                    traceparent=tx.traceparent,
                    one_phase=tx.one_phase,
                ),
                # one-phase: recovery must know to ask rather than presume (the Prepare's send
                # makes it durable first, as the driver contract says; forced to say so)
                force=tx.one_phase,
            )
        ]
        for branch in begin.branches:
            prepare = Prepare(
                tx_id=tx.tx_id,
                participant=branch.participant,
                operation=branch.operation,
                args=branch.args,
                deadline_ms=deadline_ms,
                participants=tx.participants,
                one_phase=tx.one_phase,
            )
            effects.append(
                Send(topology.participant_queue(branch.participant), prepare, tx.traceparent)
            )
        effects.append(StartTimer((VOTE_TIMER, tx.tx_id), deadline_ms))
        return effects

    def _vote(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        vote = _message(event, Vote)
        if vote.participant not in tx.participants:
            return [_stranger(tx, vote)]
        if vote.vote is VoteKind.NO:
            reason = vote.reason or "voted NO"
            reason = f"{vote.participant} voted NO: {reason}"
            return self._abort(tx, reason, vote.participant, no_voter=vote.participant)
        if vote.vote is VoteKind.COMMITTED and not tx.one_phase:
            return [ProtocolViolation(tx.tx_id, f"{vote.participant} voted COMMITTED in two-phase")]
        tx.votes[vote.participant] = vote.vote
        if len(tx.votes) < len(tx.participants):
            return []
        return self._commit(tx, now_ms)

    def _vote_timeout(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        silent = [p for p in tx.participants if p not in tx.votes]
        begin = tx.begin
        timeout = begin.timeout_ms if begin else 0
        reason = f"no vote from {', '.join(silent)} within {timeout} ms"
        if tx.one_phase:
            return self._resolve(tx, reason, silent[0] if silent else None, now_ms)
        return self._abort(tx, reason, silent[0] if silent else None)

    # ---- one phase: the vote may be the outcome, so a missing one is asked for, never presumed

    def _resolve(
        self, tx: Transaction, reason: str, at_fault: str | None, now_ms: int
    ) -> list[Effect]:
        tx.state = TxState.RESOLVING
        tx.abort_reason, tx.at_fault = reason, at_fault
        tx.resend_delay_ms = self.settings.resend_initial_ms
        if now_ms < tx.deadline_ms:
            # Asked only once the PREPARE is too late to run: the participant's NO then holds,
            # for its tombstone outlives the deadline and the deadline outlives the tombstone.
            return [StartTimer((RESEND_TIMER, tx.tx_id), tx.deadline_ms)]
        return self._ask(tx, now_ms)

    def _ask(self, tx: Transaction, now_ms: int) -> list[Effect]:
        effects: list[Effect] = [self._one_phase_abort(tx, p) for p in tx.participants]
        return [*effects, self._next_resend_timer(tx, now_ms)]

    def _one_phase_abort(self, tx: Transaction, participant: str) -> Send:
        abort = Abort(
            tx_id=tx.tx_id, participant=participant, reason=tx.abort_reason, one_phase=True
        )
        return Send(topology.participant_queue(participant), abort, tx.traceparent)

    def _resend_abort(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        return self._ask(tx, now_ms)

    def _ask_inquirer(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        """A branch that declined one phase, prepared and is in doubt: the same question."""
        inquire = _message(event, Inquire)
        if inquire.participant not in tx.participants:
            return []
        return [self._one_phase_abort(tx, inquire.participant)]

    def _answer(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        vote = _message(event, Vote)
        if vote.participant not in tx.participants:
            return [_stranger(tx, vote)]
        if vote.vote is VoteKind.COMMITTED:
            tx.votes[vote.participant] = vote.vote
            return self._commit(tx, now_ms)
        if vote.vote is VoteKind.NO:
            effects = self._abort(tx, tx.abort_reason, tx.at_fault, no_voter=vote.participant)
            return [CancelTimer((RESEND_TIMER, tx.tx_id)), *effects]
        return []  # a YES from before it heard the question: its answer to it follows

    def _commit(self, tx: Transaction, now_ms: int) -> list[Effect]:
        voters = tuple(p for p in tx.participants if tx.votes.get(p) is VoteKind.YES)
        committed = Outcome(tx_id=tx.tx_id, outcome=OutcomeKind.COMMITTED)
        timer = RESEND_TIMER if tx.state is TxState.RESOLVING else VOTE_TIMER
        effects: list[Effect] = [
            Persist(
                TxCommitting(tx_id=tx.tx_id, participants=voters, reply_to=tuple(tx.reply_to)),
                force=True,
            ),
            CancelTimer((timer, tx.tx_id)),
        ]
        effects += [
            Send(
                topology.participant_queue(p), Commit(tx_id=tx.tx_id, participant=p), tx.traceparent
            )
            for p in voters
        ]
        effects += [Send(q, committed, tx.traceparent) for q in tx.reply_to]
        if not voters:  # every branch was read-only or committed in one phase: no phase 2
            return [*effects, *self._end(tx)]
        tx.state = TxState.COMMITTING
        tx.awaiting_ack = set(voters)
        tx.resend_delay_ms = self.settings.resend_initial_ms
        # until every YES voter ACKs: a lost COMMIT or ACK must not leave the transaction open
        return [*effects, self._first_resend_timer(tx, now_ms)]

    def _abort(
        self,
        tx: Transaction,
        reason: str,
        at_fault: str | None,
        *,
        send_aborts: bool = True,
        no_voter: str | None = None,
    ) -> list[Effect]:
        effects: list[Effect] = [
            Persist(
                TxAborted(
                    tx_id=tx.tx_id, reason=reason, at_fault=at_fault, participants=tx.participants
                ),
                force=True,
            )
        ]
        if tx.state is TxState.VOTING:
            effects.append(CancelTimer((VOTE_TIMER, tx.tx_id)))
        if send_aborts:
            # A NO or READ_ONLY voter has already released everything: it needs no ABORT.
            told = [
                p
                for p in tx.participants
                if p != no_voter and tx.votes.get(p) is not VoteKind.READ_ONLY
            ]
            effects += [
                Send(
                    topology.participant_queue(p),
                    Abort(tx_id=tx.tx_id, participant=p, reason=reason),
                    tx.traceparent,
                )
                for p in told
            ]
        outcome = Outcome(
            tx_id=tx.tx_id, outcome=OutcomeKind.ABORTED, reason=reason, at_fault=at_fault
        )
        effects += [Send(q, outcome, tx.traceparent) for q in tx.reply_to + tx.status_reply_to]
        self.transactions.pop(tx.tx_id, None)
        effects.append(Forget(tx.tx_id))
        return effects

    def _ack(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        tx.awaiting_ack.discard(_message(event, Ack).participant)
        if tx.awaiting_ack:
            return []
        return [CancelTimer((RESEND_TIMER, tx.tx_id)), *self._end(tx)]

    def _end(self, tx: Transaction) -> list[Effect]:
        self.transactions.pop(tx.tx_id, None)
        return [Persist(TxEnded(tx_id=tx.tx_id), force=False), Forget(tx.tx_id)]

    def _resend_commits(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        effects: list[Effect] = [
            Send(
                topology.participant_queue(p), Commit(tx_id=tx.tx_id, participant=p), tx.traceparent
            )
            for p in sorted(tx.awaiting_ack)
        ]
        return [*effects, self._next_resend_timer(tx, now_ms)]

    def _next_resend_timer(self, tx: Transaction, now_ms: int) -> StartTimer:
        """The next re-send, after the current delay; the delay doubles up to the maximum."""
        timer = StartTimer((RESEND_TIMER, tx.tx_id), now_ms + tx.resend_delay_ms)
        tx.resend_delay_ms = min(tx.resend_delay_ms * 2, self.settings.resend_max_ms)
        return timer

    def _first_resend_timer(self, tx: Transaction, now_ms: int) -> StartTimer:
        return StartTimer((RESEND_TIMER, tx.tx_id), now_ms + tx.resend_delay_ms)

    def _commit_again(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        """A duplicate YES vote or an inquiry while committing: that participant missed COMMIT."""
        message = event.message if isinstance(event, Incoming) else None
        participant = getattr(message, "participant", "")
        if participant not in tx.awaiting_ack:
            return []
        commit = Commit(tx_id=tx.tx_id, participant=participant)
        return [Send(topology.participant_queue(participant), commit, tx.traceparent)]

    def _still_deciding(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        """Nothing to tell yet: the decision goes to every participant once it is made, and the
        inquirer's timer asks again meanwhile. (An Outcome is no message for a participant's
        queue: the boundary refuses it, with whatever shares its envelope.)"""
        return []

    def _look_up_for_asker(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        """A YES vote or an inquiry for a transaction not in memory: the log answers (rule 4).

        Not in memory means finished (ENDED, or aborted) or never begun here; an ENDED commit is
        still in the log, and its late asker must hear COMMIT, not a presumed abort.
        """
        message = event.message if isinstance(event, Incoming) else None
        if isinstance(message, Vote) and message.vote is not VoteKind.YES:
            return []  # a NO or READ_ONLY voter holds nothing: nothing to tell it
        tx.askers.append(getattr(message, "participant", ""))
        tx.traceparent = tx.traceparent or _traceparent(event)
        if tx.state is TxState.LOOKING_UP:
            return []
        tx.state = TxState.LOOKING_UP
        self.transactions[tx.tx_id] = tx
        return [LookUp(tx.tx_id)]

    def _answer_askers(self, tx: Transaction, committed: bool) -> list[Effect]:
        answers: list[Effect] = []
        for participant in dict.fromkeys(tx.askers):
            queue = topology.participant_queue(participant)
            if committed:
                answers.append(Send(queue, Commit(tx_id=tx.tx_id, participant=participant)))
            else:
                reason = "no decision on record: presumed abort"
                abort = Abort(tx_id=tx.tx_id, participant=participant, reason=reason)
                answers.append(Send(queue, abort, tx.traceparent))
        return answers

    def _ignore(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        return []

    def _unroutable(self, tx: Transaction, event: Event, now_ms: int) -> list[Effect]:
        assert isinstance(event, Unroutable)
        if tx.state is TxState.VOTING and event.participant in tx.participants:
            queue = topology.participant_queue(event.participant)
            reason = f"unknown participant {event.participant!r}: no queue {queue!r} exists"
            return self._abort(tx, reason, event.participant)
        return []

    def _recover(self, event: Recovered, now_ms: int) -> list[Effect]:
        effects: list[Effect] = []
        for tx_id, records in event.unfinished.items():
            begun = next((r for r in records if isinstance(r, TxBegun)), None)
            committing = next((r for r in records if isinstance(r, TxCommitting)), None)
            tx = Transaction(tx_id, TxState.NONE)
            if begun is not None:
                self._restore(tx, begun)
            if committing is not None and not committing.participants:
                effects += self._end(tx)  # nothing to wait for: only the lazy END was lost
            elif committing is not None:
                tx.state = TxState.COMMITTING
                tx.awaiting_ack = set(committing.participants)
                tx.resend_delay_ms = self.settings.resend_initial_ms
                self.transactions[tx_id] = tx
                effects += self._resend_commits(tx, event, now_ms)
            elif begun is not None and begun.one_phase:
                self.transactions[tx_id] = tx
                reason = "the coordinator restarted before the one-phase vote arrived"
                effects += self._resolve(tx, reason, None, now_ms)
            elif begun is not None:
                tx.state = TxState.VOTING
                effects += self._abort(tx, "the coordinator restarted before deciding", None)
        return effects

    @staticmethod
    def _restore(tx: Transaction, begun: TxBegun) -> None:
        tx.participants = tuple(b.participant for b in begun.branches)
        tx.reply_to = list(dict.fromkeys([begun.reply_to, *tx.reply_to]))
        tx.traceparent = begun.traceparent or tx.traceparent
        tx.one_phase = begun.one_phase
        tx.deadline_ms = begun.deadline_ms


def _tx_id(event: Event) -> str:
    if isinstance(event, Incoming):
        return getattr(event.message, "tx_id", "")
    if isinstance(event, TimerFired):
        return event.key[1]
    return event.tx_id


def _stranger(tx: Transaction, vote: Vote) -> ProtocolViolation:
    return ProtocolViolation(tx.tx_id, f"vote from {vote.participant!r}, not a participant")


def _message(event: Event, kind: type[M]) -> M:
    assert isinstance(event, Incoming) and isinstance(event.message, kind)
    return event.message


def _traceparent(event: Event) -> str:
    return event.traceparent if isinstance(event, Incoming) else ""


def _recorded_outcome(records: list[CoordinatorRecord]) -> Outcome | None:
    for record in records:
        if isinstance(record, TxCommitting):
            return Outcome(tx_id=record.tx_id, outcome=OutcomeKind.COMMITTED)
        if isinstance(record, TxAborted):
            return Outcome(
                tx_id=record.tx_id,
                outcome=OutcomeKind.ABORTED,
                reason=record.reason,
                at_fault=record.at_fault,
            )
    return None


C = CoordinatorCore
N, L, V, K = TxState.NONE, TxState.LOOKING_UP, TxState.VOTING, TxState.COMMITTING
Q = TxState.RESOLVING

#: (state, event kind) -> handler. Everything else is a protocol violation.
TRANSITIONS: dict[tuple[TxState, str], Handler] = {
    (N, "Begin"): C._begin_look_up,
    (L, "Begin"): C._join_begin,
    (V, "Begin"): C._join_begin,
    (K, "Begin"): C._join_begin,
    (N, "StatusQuery"): C._status_look_up,
    (L, "StatusQuery"): C._join_status,
    (V, "StatusQuery"): C._join_status,
    (K, "StatusQuery"): C._join_status,
    (L, "HistoryLoaded"): C._history_loaded,
    (N, "Vote"): C._look_up_for_asker,
    (L, "Vote"): C._look_up_for_asker,
    (V, "Vote"): C._vote,
    (K, "Vote"): C._commit_again,
    (N, "Ack"): C._ignore,  # late duplicate after END
    (L, "Ack"): C._ignore,
    (V, "Ack"): C._ignore,  # from an earlier incarnation of the same tx_id
    (K, "Ack"): C._ack,
    (N, "Inquire"): C._look_up_for_asker,
    (L, "Inquire"): C._look_up_for_asker,
    (V, "Inquire"): C._still_deciding,
    (K, "Inquire"): C._commit_again,
    (N, "Timer:vote"): C._ignore,  # a timer that raced with the decision
    (L, "Timer:vote"): C._ignore,
    (V, "Timer:vote"): C._vote_timeout,
    (K, "Timer:vote"): C._ignore,
    (N, "Timer:resend"): C._ignore,
    (L, "Timer:resend"): C._ignore,
    (V, "Timer:resend"): C._ignore,
    (K, "Timer:resend"): C._resend_commits,
    (N, "Unroutable"): C._ignore,
    (L, "Unroutable"): C._ignore,
    (V, "Unroutable"): C._unroutable,
    (K, "Unroutable"): C._ignore,
    (Q, "Begin"): C._join_begin,  # told when the participant answers
    (Q, "StatusQuery"): C._join_status,  # pending
    (Q, "Vote"): C._answer,
    (Q, "Ack"): C._ignore,
    (Q, "Inquire"): C._ask_inquirer,
    (Q, "Timer:vote"): C._ignore,
    (Q, "Timer:resend"): C._resend_abort,
    (Q, "Unroutable"): C._ignore,  # the queue may come back; the answer is still needed
}

#: kinds of message a coordinator never receives (they flow the other way)
WRONG_DIRECTION = ("Prepare", "Commit", "Abort", "Outcome")
EVENT_KINDS = (
    "Begin",
    "StatusQuery",
    "HistoryLoaded",
    "Vote",
    "Ack",
    "Inquire",
    "Timer:vote",
    "Timer:resend",
    "Unroutable",
    *WRONG_DIRECTION,
)
