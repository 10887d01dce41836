"""A participant remembers at most ``remember_max`` finished branches (docs/architecture.md §7).

A flood of forged ABORTs for made-up transactions once grew memory and the driver's timers by
one branch each, for a minute. Now the oldest finished branches are forgotten early, and until
they would have been forgotten anyway a PREPARE for an unknown branch reads the log first: a
duplicate of a branch that finished here must never run again.
"""

from __future__ import annotations

from typing import Any

import pytest

from participant.core import (
    BranchExecuted,
    BranchHistory,
    BranchState,
    ExecuteBranch,
    LookUpBranch,
    ParticipantCore,
    ParticipantSettings,
    Recovered,
)
from schemas.effects import CancelTimer, Forget, Incoming, Persist, Send, StartTimer, TimerFired
from schemas.messages import Abort, Commit, Prepare, Vote, VoteKind
from schemas.records import BranchCompleted, Decision

NOW = 1_000_000
ME = "p"
DEADLINE = NOW + 1_000
REMEMBER_MS = 60_000


def core_remembering(count: int) -> ParticipantCore:
    settings = ParticipantSettings(remember_ms=REMEMBER_MS, remember_max=count)
    return ParticipantCore(ME, settings)


def prepare(tx: str, one_phase: bool = False) -> Incoming:
    return Incoming(
        Prepare(
            tx_id=tx,
            participant=ME,
            operation="debit",
            args={"amount": 5},
            deadline_ms=DEADLINE,
            participants=(ME,) if one_phase else (ME, "q"),
            one_phase=one_phase,
        )
    )


def abort(tx: str) -> Incoming:
    return Incoming(Abort(tx_id=tx, participant=ME, reason="forged"))


def committed_here(core: ParticipantCore, tx: str) -> None:
    assert core.handle(prepare(tx), NOW) == [ExecuteBranch(tx, "debit", {"amount": 5})]
    core.handle(BranchExecuted(tx, ok=True), NOW)
    core.handle(Incoming(Commit(tx_id=tx, participant=ME)), NOW)
    assert core.state_of(tx) is BranchState.COMMITTED


def votes(effects: list[Any]) -> list[VoteKind]:
    return [e.message.vote for e in effects if isinstance(e, Send) and isinstance(e.message, Vote)]


def test_a_flood_of_forged_aborts_keeps_only_the_newest_and_cancels_the_rest_timers() -> None:
    core = core_remembering(3)
    for n in range(10):
        effects = core.handle(abort(f"forged-{n}"), NOW + n)
        if n >= 3:
            gone = f"forged-{n - 3}"
            assert effects[-2:] == [CancelTimer(("forget", gone)), Forget(gone)]
    assert sorted(core.branches) == ["forged-7", "forged-8", "forged-9"]
    assert list(core.finished) == ["forged-7", "forged-8", "forged-9"]
    assert core.recall_until_ms == NOW + 6 + REMEMBER_MS  # forged-6's forget time


def test_the_default_bound_holds_against_a_hundred_and_fifty_thousand_forgeries() -> None:
    core = ParticipantCore(ME)
    for n in range(150_000):
        core.handle(abort(f"forged-{n}"), NOW)
    assert len(core.branches) == len(core.finished) == core.settings.remember_max == 100_000


def test_a_branch_forgotten_by_its_timer_no_longer_counts() -> None:
    core = core_remembering(2)
    core.handle(abort("a"), NOW)
    core.handle(abort("b"), NOW)
    assert core.handle(TimerFired(("forget", "a")), NOW + REMEMBER_MS) == [Forget("a")]
    effects = core.handle(abort("c"), NOW)
    assert not any(isinstance(e, Forget) for e in effects)
    assert sorted(core.branches) == ["b", "c"]
    assert core.recall_until_ms == -1  # nothing was forgotten early


def evicted(tx: str, decision: Decision) -> ParticipantCore:
    """A core that finished ``tx`` with ``decision``, then forgot it early."""
    core = core_remembering(1)
    if decision is Decision.COMMIT:
        committed_here(core, tx)
    else:
        core.handle(abort(tx), NOW)
    core.handle(abort("newer"), NOW)
    assert core.state_of(tx) is BranchState.NONE
    return core


@pytest.mark.parametrize(
    ("history", "state", "answer"),
    [
        # committed here: the duplicate is ignored, as in memory; the first record counts
        (
            [
                BranchCompleted(tx_id="t", participant=ME, decision=Decision.COMMIT),
                BranchCompleted(tx_id="t", participant=ME, decision=Decision.ABORT),
            ],
            BranchState.COMMITTED,
            [],
        ),
        # aborted here (the ABORT overtook its PREPARE): NO, without running
        (
            [BranchCompleted(tx_id="t", participant=ME, decision=Decision.ABORT)],
            BranchState.ABORTED,
            [VoteKind.NO],
        ),
    ],
)
def test_a_duplicate_prepare_of_a_branch_forgotten_early_is_answered_from_the_log(
    history: list[Any], state: BranchState, answer: list[VoteKind]
) -> None:
    core = evicted("t", history[0].decision)
    assert core.handle(prepare("t"), NOW + 1) == [LookUpBranch("t")]
    assert core.state_of("t") is BranchState.LOOKING_UP
    effects = core.handle(BranchHistory("t", history), NOW + 2)
    assert not any(isinstance(e, ExecuteBranch | Persist) for e in effects)
    assert votes(effects) == answer
    assert core.state_of("t") is state
    assert "t" in core.finished  # remembered again, under the same bound


def test_a_native_commit_without_its_record_counts_as_committed() -> None:
    core = evicted("t", Decision.COMMIT)
    core.handle(prepare("t"), NOW + 1)
    effects = core.handle(BranchHistory("t", [], resource_committed=True), NOW + 2)
    assert votes(effects) == []
    assert core.state_of("t") is BranchState.COMMITTED


def test_a_prepare_the_log_does_not_know_runs_after_the_look_up() -> None:
    core = evicted("old", Decision.ABORT)
    assert core.handle(prepare("new"), NOW + 1) == [LookUpBranch("new")]
    assert core.handle(BranchHistory("new", []), NOW + 2) == [
        ExecuteBranch("new", "debit", {"amount": 5})
    ]
    assert core.state_of("new") is BranchState.EXECUTING


@pytest.mark.parametrize("one_phase", [False, True])
def test_an_abort_during_the_look_up_leaves_a_tombstone_and_a_no_and_runs_nothing(
    one_phase: bool,
) -> None:
    core = evicted("old", Decision.ABORT)
    core.handle(prepare("new", one_phase), NOW + 1)
    question = Abort(tx_id="new", participant=ME, reason="late", one_phase=one_phase)
    assert core.handle(Incoming(question), NOW + 2) == []
    effects = core.handle(BranchHistory("new", []), NOW + 3)
    assert not any(isinstance(e, ExecuteBranch) for e in effects)
    tombstones = [e for e in effects if isinstance(e, Persist)]
    assert [t.record.decision for t in tombstones] == [Decision.ABORT]  # type: ignore[union-attr]
    assert tombstones[0].force is one_phase  # the one-phase NO is the outcome: rule 7
    assert votes(effects) == [VoteKind.NO]


def test_once_everything_forgotten_early_is_due_a_prepare_runs_at_once() -> None:
    core = evicted("old", Decision.ABORT)
    later = core.recall_until_ms + 1
    message = Prepare(
        tx_id="new",
        participant=ME,
        operation="debit",
        args={},
        deadline_ms=later + 1_000,
        participants=(ME, "q"),
    )
    assert core.handle(Incoming(message), later) == [ExecuteBranch("new", "debit", {})]


def test_recovery_remembers_only_the_newest_completions_and_recalls_the_rest() -> None:
    core = core_remembering(2)
    done = [
        BranchCompleted(tx_id=f"t{n}", participant=ME, decision=Decision.COMMIT) for n in range(5)
    ]
    effects = core.handle(Recovered([], completed=done), NOW)
    assert sorted(core.branches) == ["t3", "t4"]
    assert sum(isinstance(e, StartTimer) for e in effects) == 5  # each cancelled when forgotten
    assert [e.tx_id for e in effects if isinstance(e, Forget)] == ["t0", "t1", "t2"]
    assert core.recall_until_ms == NOW + REMEMBER_MS
    assert core.handle(prepare("t0"), NOW + 1) == [LookUpBranch("t0")]


def test_a_prepared_branch_is_never_forgotten_to_make_room() -> None:
    core = core_remembering(1)
    core.handle(prepare("in-doubt"), NOW)
    core.handle(BranchExecuted("in-doubt", ok=True), NOW)
    for n in range(5):
        core.handle(abort(f"forged-{n}"), NOW)
    assert core.state_of("in-doubt") is BranchState.PREPARED
    assert core.in_doubt() == ["in-doubt"]
