"""A participant's protocol as a transition table (presumed abort).

One ``ParticipantCore`` serves one participant name. Each branch (one per transaction) moves
NONE -> EXECUTING -> PREPARED -> COMMITTED | ABORTED. The handler itself runs in the driver: the
core asks for it with ``ExecuteBranch`` and hears back ``BranchExecuted``.

One phase (``Prepare.one_phase``, the transaction's only branch): EXECUTING -> COMMITTED with a
COMMITTED vote, or -> ABORTED with NO. The coordinator, missing the vote, asks with
``Abort(one_phase)``; every state answers it with a vote, and NONE first reads the log and the
resource (LOOKING_UP): the branch may have committed and been forgotten since.

Terminal branches stay in memory until a while after their deadline so that late duplicates are
answered from memory, then the log (and presumed abort) answers for them. At most
``remember_max`` of them stay: a flood of forged ABORTs must not grow memory without bound. Until
the last one forgotten early would have been forgotten anyway, a PREPARE for a branch not in
memory first reads the log (LOOKING_UP, ``recalling``): it may be a duplicate of one that
finished here, which must not run twice.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from participant.core.events import (
    AbortBranch,
    BranchExecuted,
    BranchHistory,
    CommitBranch,
    Event,
    ExecuteBranch,
    LookUpBranch,
    Recovered,
)
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
    Inquire,
    Prepare,
    Vote,
    VoteKind,
)
from schemas.records import BranchCompleted, BranchPrepared, Decision

Effect = (
    Persist
    | Send
    | StartTimer
    | CancelTimer
    | Forget
    | ProtocolViolation
    | ExecuteBranch
    | CommitBranch
    | AbortBranch
    | LookUpBranch
)
M = TypeVar("M")

INQUIRE_TIMER = "inquire"
FORGET_TIMER = "forget"
#: the event kind of ``Abort(one_phase=True)``: a question, answered in every state
ONE_PHASE_ABORT = "Abort:one_phase"


class BranchState(enum.Enum):
    NONE = "none"
    EXECUTING = "executing"
    PREPARED = "prepared"
    COMMITTED = "committed"
    ABORTED = "aborted"
    #: a one-phase question about a branch not in memory waits for the log and the resource
    LOOKING_UP = "looking_up"


@dataclass(frozen=True)
class ParticipantSettings:
    #: how long past its deadline a prepared branch waits for the decision before inquiring
    inquire_after_ms: int = 1_000
    inquire_max_ms: int = 30_000
    #: how long past its deadline a finished branch is remembered in memory
    remember_ms: int = 60_000
    #: how many finished branches are remembered at most; the oldest are forgotten first
    remember_max: int = 100_000


@dataclass
class BranchInfo:
    tx_id: str
    state: BranchState
    operation: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    deadline_ms: int = 0
    traceparent: str = ""
    abort_requested: bool = False
    inquire_delay_ms: int = 0
    one_phase: bool = False
    #: a PREPARE waits for the log: this branch may have finished here and been forgotten early
    recalling: bool = False


Handler = Callable[["ParticipantCore", BranchInfo, Event, int], list[Effect]]


def _kind(event: Event) -> str:
    if isinstance(event, Incoming):
        if isinstance(event.message, Abort) and event.message.one_phase:
            return ONE_PHASE_ABORT
        return type(event.message).__name__
    if isinstance(event, TimerFired):
        return f"Timer:{event.key[0]}"
    return type(event).__name__


class ParticipantCore:
    def __init__(self, name: str, settings: ParticipantSettings | None = None) -> None:
        self.name = name
        self.settings = settings or ParticipantSettings()
        self.coordinator_queue = topology.COORDINATOR_QUEUE
        self.branches: dict[str, BranchInfo] = {}
        #: finished branches in the order they finished, with when each is due to be forgotten
        #: (an OrderedDict: a plain dict's first key costs a scan past every key popped before
        #: it, which at the bound is once per finished branch)
        self.finished: OrderedDict[str, int] = OrderedDict()
        #: until then a PREPARE for a branch not in memory may be for one forgotten early
        self.recall_until_ms = -1

    def handle(self, event: Event, now_ms: int) -> list[Effect]:
        if isinstance(event, Recovered):
            return self._recover(event, now_ms)
        tx_id = _tx_id(event)
        message = event.message if isinstance(event, Incoming) else None
        if message is not None and getattr(message, "participant", self.name) != self.name:
            return [ProtocolViolation(tx_id, f"message for {message.participant!r}")]  # type: ignore[union-attr]
        branch = self.branches.get(tx_id) or BranchInfo(tx_id, BranchState.NONE)
        handler = TRANSITIONS.get((branch.state, _kind(event)))
        if handler is None:
            description = f"{_kind(event)} is not valid in state {branch.state.value}"
            return [ProtocolViolation(tx_id, description)]
        return handler(self, branch, event, now_ms)

    def state_of(self, tx_id: str) -> BranchState:
        branch = self.branches.get(tx_id)
        return branch.state if branch else BranchState.NONE

    def in_doubt(self) -> list[str]:
        return [b.tx_id for b in self.branches.values() if b.state is BranchState.PREPARED]

    # ---- transitions -------------------------------------------------------------------------

    def _prepare(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        prepare = _message(event, Prepare)
        branch.operation, branch.args = prepare.operation, prepare.args
        branch.deadline_ms, branch.traceparent = prepare.deadline_ms, _traceparent(event)
        if now_ms > prepare.deadline_ms and prepare.one_phase:
            # It may have committed here and been forgotten since: a NO would then be taken
            # for the outcome. The log and the resource answer, as they answer the question.
            return self._look_up(branch, event, now_ms)
        if now_ms > prepare.deadline_ms:
            # Nothing was done here, so nothing is logged or remembered: this may be a duplicate
            # for a branch that committed here and was forgotten since (its log must not say
            # "aborted" now, and a re-sent COMMIT must still be ACKed).
            reason = f"PREPARE arrived {now_ms - prepare.deadline_ms} ms after its deadline"
            return [self._vote(branch, VoteKind.NO, reason)]
        branch.one_phase = prepare.one_phase
        if now_ms <= self.recall_until_ms:
            branch.recalling = True
            return self._look_up(branch, event, now_ms)
        return self._execute(branch)

    def _execute(self, branch: BranchInfo) -> list[Effect]:
        self.branches[branch.tx_id] = branch
        branch.state = BranchState.EXECUTING
        return [ExecuteBranch(branch.tx_id, branch.operation, branch.args, branch.one_phase)]

    def _executed(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        assert isinstance(event, BranchExecuted)
        if not event.ok:
            return self._refuse(branch, event.reason)
        if event.committed:  # one phase; also the answer to an Abort(one_phase) meanwhile
            if not branch.one_phase:
                return [ProtocolViolation(branch.tx_id, "committed a two-phase branch at once")]
            return [
                *self._finish(branch, Decision.COMMIT, "", force=True),  # before the vote
                self._vote(branch, VoteKind.COMMITTED),
            ]
        if branch.abort_requested:
            # The ABORT overtook the handler: undo what it prepared, and never vote YES.
            effects: list[Effect] = [AbortBranch(branch.tx_id, branch.operation, branch.args)]
            return effects + self._refuse(branch, "aborted by the coordinator while preparing")
        branch.state = BranchState.PREPARED
        branch.inquire_delay_ms = self.settings.inquire_after_ms
        record = BranchPrepared(
            tx_id=branch.tx_id,
            participant=self.name,
            operation=branch.operation,
            args=branch.args,
            deadline_ms=branch.deadline_ms,
            traceparent=branch.traceparent,
        )
        return [
            Persist(record, force=True),  # write-ahead rule 1
            self._vote(branch, VoteKind.YES),
            StartTimer(_inquire_key(branch), branch.deadline_ms + branch.inquire_delay_ms),
        ]

    def _refuse(self, branch: BranchInfo, reason: str) -> list[Effect]:
        return [
            *self._finish(branch, Decision.ABORT, reason),
            self._vote(branch, VoteKind.NO, reason),
        ]

    def _abort_while_executing(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        branch.abort_requested = True
        return []

    def _commit(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        return [
            CommitBranch(branch.tx_id, branch.operation, branch.args),
            CancelTimer(_inquire_key(branch)),
            *self._finish(branch, Decision.COMMIT, "", force=True),  # before the ACK: rule 6
            self._send(branch, Ack(tx_id=branch.tx_id, participant=self.name)),
        ]

    def _abort(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        reason = _message(event, Abort).reason
        return [
            AbortBranch(branch.tx_id, branch.operation, branch.args),
            CancelTimer(_inquire_key(branch)),
            *self._finish(branch, Decision.ABORT, reason),
        ]

    def _abort_before_prepare(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        """Remember the ABORT so that its PREPARE, if it comes later, votes NO."""
        self.branches[branch.tx_id] = branch
        branch.deadline_ms = now_ms
        return self._finish(branch, Decision.ABORT, _message(event, Abort).reason)

    def _finish(
        self, branch: BranchInfo, decision: Decision, reason: str, *, force: bool = False
    ) -> list[Effect]:
        record = BranchCompleted(
            tx_id=branch.tx_id, participant=self.name, decision=decision, reason=reason
        )
        forget_at = max(branch.deadline_ms, 0) + self.settings.remember_ms
        return [Persist(record, force=force), *self._remember(branch, decision, forget_at)]

    def _remember(self, branch: BranchInfo, decision: Decision, forget_at: int) -> list[Effect]:
        """Keep a finished branch in memory until ``forget_at``, forgetting the oldest early
        when there are too many (see the module's docstring)."""
        branch.state = BranchState.COMMITTED if decision is Decision.COMMIT else BranchState.ABORTED
        branch.args = {}  # what a finished branch answers needs no arguments: hold no memory
        self.branches[branch.tx_id] = branch
        self.finished[branch.tx_id] = forget_at
        self.finished.move_to_end(branch.tx_id)
        effects: list[Effect] = [StartTimer((FORGET_TIMER, branch.tx_id), forget_at)]
        while len(self.finished) > self.settings.remember_max:
            oldest, its_forget_at = self.finished.popitem(last=False)
            self.recall_until_ms = max(self.recall_until_ms, its_forget_at)
            del self.branches[oldest]
            effects += [CancelTimer((FORGET_TIMER, oldest)), Forget(oldest)]
        return effects

    # ---- one phase: Abort(one_phase) asks what happened, and every state answers ------------

    def _look_up(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        self.branches[branch.tx_id] = branch
        branch.state = BranchState.LOOKING_UP
        branch.traceparent = _traceparent(event)
        return [LookUpBranch(branch.tx_id)]

    def _history(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        assert isinstance(event, BranchHistory)
        if branch.recalling:
            return self._recalled(branch, event)
        branch.deadline_ms = now_ms
        decisions = {r.decision for r in event.records if isinstance(r, BranchCompleted)}
        if event.resource_committed or Decision.COMMIT in decisions:
            # A missing COMMITTED record (a crash right after the resource's commit) is written.
            done = self._finish(branch, Decision.COMMIT, "", force=True)
            if Decision.COMMIT in decisions:
                done = [e for e in done if not isinstance(e, Persist)]
            return [*done, self._vote(branch, VoteKind.COMMITTED)]
        undo: list[Effect] = []
        if any(isinstance(r, BranchPrepared) for r in event.records) and not decisions:
            undo.append(AbortBranch(branch.tx_id, "", {}))
        # The tombstone is forced: a PREPARE still on its way must find it and vote NO, also
        # after a crash, for the coordinator takes this NO as the outcome.
        reason = "aborted by the coordinator before it ran here"
        tombstone = self._finish(branch, Decision.ABORT, reason, force=True)
        return [*undo, *tombstone, self._vote(branch, VoteKind.NO, reason)]

    def _recalled(self, branch: BranchInfo, event: BranchHistory) -> list[Effect]:
        """A PREPARE read the log first: answer as memory would have, or run the branch."""
        branch.recalling = False
        decisions = [r.decision for r in event.records if isinstance(r, BranchCompleted)]
        if decisions or event.resource_committed:
            # It finished here and was forgotten early: the first COMPLETED record counts, as at
            # recovery. COMMITTED ignores a duplicate PREPARE; ABORTED answers it NO.
            committed = event.resource_committed or decisions[0] is Decision.COMMIT
            decision = Decision.COMMIT if committed else Decision.ABORT
            forget_at = max(branch.deadline_ms, 0) + self.settings.remember_ms
            remembered = self._remember(branch, decision, forget_at)
            if committed:
                return remembered
            return [*remembered, self._vote(branch, VoteKind.NO, "the transaction was aborted")]
        if branch.abort_requested:  # an ABORT (or the one-phase question) came meanwhile
            reason = "aborted by the coordinator before it ran here"
            tombstone = self._finish(branch, Decision.ABORT, reason, force=branch.one_phase)
            return [*tombstone, self._vote(branch, VoteKind.NO, reason)]
        return self._execute(branch)

    def _abort_while_looking_up(
        self, branch: BranchInfo, event: Event, now_ms: int
    ) -> list[Effect]:
        """Only a PREPARE that reads the log first runs afterwards; it must then not run."""
        branch.abort_requested = True
        return []

    def _abort_and_answer(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        """A branch that declined one phase and prepared: abort it, then say NO."""
        return [*self._abort(branch, event, now_ms), self._vote(branch, VoteKind.NO, "aborted")]

    def _say_committed(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        return [self._vote(branch, VoteKind.COMMITTED)]

    def _vote(self, branch: BranchInfo, kind: VoteKind, reason: str = "") -> Send:
        return self._send(
            branch, Vote(tx_id=branch.tx_id, participant=self.name, vote=kind, reason=reason)
        )

    def _vote_again(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        """A duplicate PREPARE, or the one-phase question to an aborted branch: the coordinator
        may have missed the vote, so repeat it."""
        if branch.state is BranchState.PREPARED:
            return [self._vote(branch, VoteKind.YES)]
        return [self._vote(branch, VoteKind.NO, "the transaction was already aborted here")]

    def _ack_again(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        return [self._send(branch, Ack(tx_id=branch.tx_id, participant=self.name))]

    def _inquire(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        delay = branch.inquire_delay_ms
        branch.inquire_delay_ms = min(delay * 2, self.settings.inquire_max_ms)
        return [
            self._send(branch, Inquire(tx_id=branch.tx_id, participant=self.name)),
            StartTimer(_inquire_key(branch), now_ms + branch.inquire_delay_ms),
        ]

    def _forget(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        del self.branches[branch.tx_id]
        self.finished.pop(branch.tx_id, None)
        return [Forget(branch.tx_id)]

    def _contradiction(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        """COMMIT for an aborted branch: a heuristic hazard, never applied, always reported."""
        description = f"{_kind(event)} received for a branch that is {branch.state.value}"
        return [ProtocolViolation(branch.tx_id, description)]

    def _ignore(self, branch: BranchInfo, event: Event, now_ms: int) -> list[Effect]:
        return []

    # ---- recovery ----------------------------------------------------------------------------

    def _recover(self, event: Recovered, now_ms: int) -> list[Effect]:
        effects: list[Effect] = []
        for record in event.prepared:
            branch = BranchInfo(
                record.tx_id,
                BranchState.PREPARED,
                operation=record.operation,
                args=record.args,
                deadline_ms=record.deadline_ms,
                traceparent=record.traceparent,
                inquire_delay_ms=self.settings.inquire_after_ms,
            )
            self.branches[record.tx_id] = branch
            if record.tx_id in event.resource_committed:
                # Committed in the resource, crashed before the COMPLETED record: finish the log
                # and ACK, so that the coordinator can end the transaction.
                effects += self._finish(branch, Decision.COMMIT, "", force=True)
                effects.append(self._send(branch, Ack(tx_id=record.tx_id, participant=self.name)))
            elif record.tx_id not in event.resource_prepared:
                effects += self._finish(branch, Decision.ABORT, "rolled back before the crash")
            else:  # in doubt: ask at once rather than wait out the deadline
                effects += self._inquire(branch, event, now_ms)
        for done in event.completed:  # remembered like branches that finished just now
            if done.tx_id in self.branches:
                continue  # the first COMPLETED record of a branch is the one that counts
            branch = BranchInfo(done.tx_id, BranchState.NONE, deadline_ms=now_ms)
            effects += self._remember(branch, done.decision, now_ms + self.settings.remember_ms)
        known = {r.tx_id for r in event.prepared}
        for tx_id in sorted(event.resource_prepared - known):
            # Prepared in the resource but no PREPARED record: this branch never voted YES.
            effects.append(AbortBranch(tx_id, "", {}))
        return effects

    def _send(self, branch: BranchInfo, message: Vote | Ack | Inquire) -> Send:
        return Send(self.coordinator_queue, message, branch.traceparent)


def _inquire_key(branch: BranchInfo) -> tuple[str, str]:
    return (INQUIRE_TIMER, branch.tx_id)


def _tx_id(event: Event) -> str:
    if isinstance(event, Incoming):
        return getattr(event.message, "tx_id", "")
    if isinstance(event, TimerFired):
        return event.key[1]
    return event.tx_id


def _message(event: Event, kind: type[M]) -> M:
    assert isinstance(event, Incoming) and isinstance(event.message, kind)
    return event.message


def _traceparent(event: Event) -> str:
    return event.traceparent if isinstance(event, Incoming) else ""


P = ParticipantCore
N, E, R = BranchState.NONE, BranchState.EXECUTING, BranchState.PREPARED
C, A, L = BranchState.COMMITTED, BranchState.ABORTED, BranchState.LOOKING_UP

#: (state, event kind) -> handler. Everything else is a protocol violation.
TRANSITIONS: dict[tuple[BranchState, str], Handler] = {
    (N, "Prepare"): P._prepare,
    (E, "Prepare"): P._ignore,  # duplicate while the handler runs
    (R, "Prepare"): P._vote_again,
    (C, "Prepare"): P._ignore,  # late duplicate: the coordinator has every vote already
    (A, "Prepare"): P._vote_again,  # an ABORT overtook its PREPARE: vote NO
    (E, "BranchExecuted"): P._executed,
    (N, "Commit"): P._ack_again,  # committed and forgotten long ago
    (R, "Commit"): P._commit,
    (C, "Commit"): P._ack_again,
    (A, "Commit"): P._contradiction,
    (N, "Abort"): P._abort_before_prepare,
    (E, "Abort"): P._abort_while_executing,
    (R, "Abort"): P._abort,
    (C, "Abort"): P._contradiction,
    (A, "Abort"): P._ignore,
    (N, "Outcome"): P._ignore,
    (E, "Outcome"): P._ignore,
    (R, "Outcome"): P._ignore,  # "still deciding": the inquiry timer is already running
    (C, "Outcome"): P._ignore,
    (A, "Outcome"): P._ignore,
    (R, "Timer:inquire"): P._inquire,
    (N, "Timer:inquire"): P._ignore,
    (C, "Timer:inquire"): P._ignore,
    (A, "Timer:inquire"): P._ignore,
    (C, "Timer:forget"): P._forget,
    (A, "Timer:forget"): P._forget,
    (N, "Timer:forget"): P._ignore,
    # Timers are cancelled lazily; one that outlived its purpose fires into a later state.
    (E, "Timer:inquire"): P._ignore,
    (E, "Timer:forget"): P._ignore,
    (R, "Timer:forget"): P._ignore,
    (N, ONE_PHASE_ABORT): P._look_up,
    (L, ONE_PHASE_ABORT): P._abort_while_looking_up,  # answered once the log is read
    (E, ONE_PHASE_ABORT): P._abort_while_executing,  # answered when the handler is done
    (R, ONE_PHASE_ABORT): P._abort_and_answer,
    (C, ONE_PHASE_ABORT): P._say_committed,
    (A, ONE_PHASE_ABORT): P._vote_again,  # NO
    (L, "BranchHistory"): P._history,
    # The question is only asked after the PREPARE's deadline: a PREPARE still on its way is
    # too late, and the look-up's tombstone will make it vote NO (or its deadline will).
    (L, "Prepare"): P._ignore,
    (L, "Abort"): P._abort_while_looking_up,
    (L, "Outcome"): P._ignore,
    (L, "Timer:inquire"): P._ignore,
    (L, "Timer:forget"): P._ignore,
}

EVENT_KINDS = (
    "Prepare",
    "BranchExecuted",
    "Commit",
    "Abort",
    ONE_PHASE_ABORT,
    "BranchHistory",
    "Outcome",
    "Timer:inquire",
    "Timer:forget",
    "Begin",
    "Vote",
    "Ack",
    "Inquire",
    "Heartbeat",
    "StatusQuery",
)
