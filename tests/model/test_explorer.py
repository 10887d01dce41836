"""The model checker (tests/model/explorer.py) run over the real cores.

* exhaustive: every interleaving of two participants and one transaction within a few fault
  profiles (together: every process crashes at every step, duplicates, a loss, timers firing at
  any moment, a jump of time, a NO vote);
* seeded random walks: three participants, three transactions, many more faults;
* one phase: every interleaving of a single-branch transaction, whose COMMITTED vote is the
  outcome (committing, refusing, declining one phase, with status queries);
* branches forgotten early: participants that keep no finished branch in memory at all (the
  bound of ``remember_max`` at its extreme), so that every late message meets the log;
* mutations: break write-ahead rule 1 (or 2) in a core and the explorer must find it; presume
  abort in one phase, answer its question from memory only, or forget a branch early without
  reading the log for its next PREPARE, and it must find that too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from coordinator.core import CoordinatorCore
from participant.core import TRANSITIONS, BranchHistory, BranchState, LookUpBranch
from schemas.effects import Persist, Send
from schemas.messages import OutcomeKind, Vote
from tests.model import explorer
from tests.model.explorer import ALL_CHECKS, Bounds, Config

NO_FAULTS = Bounds(total_crashes=0, duplicates=0, losses=0, timer_fires=0, jumps=0)
P2_SAYS_NO = frozenset({("p2", "t1")})

#: Together these cover every kind of fault, within bounds that keep each search to seconds.
PROFILES: dict[str, Config] = {
    "every process crashes once, at any step; one duplicate": Config(
        bounds=Bounds(total_crashes=3, duplicates=1, losses=0, timer_fires=0, jumps=0)
    ),
    "a crash, a loss, a timer firing at any moment": Config(
        bounds=Bounds(total_crashes=1, duplicates=0, losses=1, timer_fires=1, jumps=0)
    ),
    "a crash, a timer, a time jump": Config(
        bounds=Bounds(total_crashes=1, duplicates=0, losses=0, timer_fires=1, jumps=1)
    ),
    "a duplicate, a loss, a timer, a time jump": Config(
        bounds=Bounds(total_crashes=0, duplicates=1, losses=1, timer_fires=1, jumps=1)
    ),
    "p2 votes NO; two crashes, a duplicate": Config(
        refuse=P2_SAYS_NO,
        bounds=Bounds(total_crashes=2, duplicates=1, losses=0, timer_fires=0, jumps=0),
    ),
    "p2 votes NO; a duplicate, a loss, a timer, a time jump": Config(
        refuse=P2_SAYS_NO,
        bounds=Bounds(total_crashes=0, duplicates=1, losses=1, timer_fires=1, jumps=1),
    ),
}


def explore_all_clean(profiles: dict[str, Config]) -> dict[str, explorer.Result]:
    """Explore every profile (two at a time) and require each to settle with no violation."""
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = dict(zip(profiles, pool.map(explorer.explore, profiles.values()), strict=True))
    for name, result in results.items():
        assert result.problem is None, f"{name}\n{result.report()}"
        print(f"{name}: {result.states} states, {result.settled} settled")
        assert result.settled > 0
    return results


def test_exhaustive_two_participants_one_transaction() -> None:
    started = time.monotonic()
    results = explore_all_clean(PROFILES)
    n = sum(r.states for r in results.values())
    print(f"explored {n} states in {time.monotonic() - started:.1f} s")
    assert n > 200_000  # 235,243 since an inquiry while voting gets no PENDING reply
    notes = set().union(*(r.notes for r in results.values()))
    print("protocol violations reported by the cores (not failures):", sorted(notes))


ONE: dict[str, Any] = {"participants": ("p1",), "transactions": (("t1", ("p1",)),)}
ONE_PHASE_FAULTS = Bounds(total_crashes=2, duplicates=1, losses=1, timer_fires=2, jumps=1)
ONE_PHASE_PROFILES: dict[str, Config] = {
    "one branch; two crashes, a duplicate, a loss, two timers, a jump": Config(
        **ONE, bounds=ONE_PHASE_FAULTS
    ),
    "one branch votes NO; the same faults": Config(
        **ONE, refuse=frozenset({("p1", "t1")}), bounds=ONE_PHASE_FAULTS
    ),
    "one branch declines one phase; a crash, a duplicate, two timers, a jump": Config(
        **ONE,
        declines=frozenset({"p1"}),
        bounds=Bounds(total_crashes=1, duplicates=1, losses=0, timer_fires=2, jumps=1),
    ),
    "one branch, status queries; a crash, a loss, two timers, a jump": Config(
        **ONE,
        status_queries=True,
        bounds=Bounds(total_crashes=1, duplicates=0, losses=1, timer_fires=2, jumps=1),
    ),
}


def test_exhaustive_one_phase() -> None:
    explore_all_clean(ONE_PHASE_PROFILES)
    # both answers are reached: the branch commits on some paths and aborts on others
    world = explorer.initial_world(Config(**ONE, bounds=NO_FAULTS))
    assert explorer.settle(world) is None
    assert world.resource["p1", "t1"] == "committed"
    assert explorer.told(world, "t1") is OutcomeKind.COMMITTED


FORGETFUL_PROFILES: dict[str, Config] = {
    "remembering nothing; a crash, a duplicate": Config(
        remember_max=0,
        bounds=Bounds(total_crashes=1, duplicates=1, losses=0, timer_fires=0, jumps=0),
    ),
    "remembering nothing, p2 votes NO; a crash, a duplicate, a loss": Config(
        remember_max=0,
        refuse=P2_SAYS_NO,
        bounds=Bounds(total_crashes=1, duplicates=1, losses=1, timer_fires=0, jumps=0),
    ),
}
FORGETFUL_ONE_PHASE = Config(
    **ONE,
    remember_max=0,
    bounds=Bounds(total_crashes=1, duplicates=1, losses=1, timer_fires=1, jumps=1),
)


def test_exhaustive_with_every_finished_branch_forgotten_at_once() -> None:
    """A PREPARE, ABORT or question that comes after its branch was forgotten early must get
    the answer memory would have given: the log is read first (participant/core/machine.py)."""
    explore_all_clean({**FORGETFUL_PROFILES, "one phase, remembering nothing": FORGETFUL_ONE_PHASE})


def _walk_config(seed: int) -> Config:
    return Config(
        participants=("p1", "p2", "p3"),
        transactions=(
            ("t1", ("p1", "p2", "p3")),
            ("t2", ("p1", "p3")),
            ("t3", ("p2",)),
            ("t4", ("p3", "p2")),
        ),
        refuse=frozenset({("p3", "t2")}) if seed % 3 == 0 else frozenset(),
        remember_max=seed % 4,  # finished branches are forgotten early, and often
        status_queries=seed % 2 == 0,
        bounds=Bounds(crashes=3, total_crashes=6, duplicates=8, losses=6, timer_fires=12, jumps=3),
    )


WALKS = 100


@pytest.mark.parametrize("block", range(4))
def test_random_walks(block: int) -> None:
    """400 seeded walks in all: three participants, four transactions, many faults."""
    for seed in range(block * WALKS, (block + 1) * WALKS):
        result = explorer.random_walk(_walk_config(seed), seed)
        assert result.problem is None, f"seed {seed}\n{result.report()}"


def test_the_explorer_reaches_the_interesting_states() -> None:
    """A sanity check of the model itself: the happy path commits everywhere, a NO aborts."""
    for refuse, expected in ((frozenset(), "committed"), (P2_SAYS_NO, "none")):
        world = explorer.initial_world(Config(refuse=refuse, bounds=NO_FAULTS))
        assert explorer.settle(world) is None
        assert world.resource[("p2", "t1")] == expected
        assert explorer.told(world, "t1") is not None


# ---- mutations: the explorer must notice a broken write-ahead rule ----------------------------

Handler = Callable[..., list[Any]]


def _vote_before_prepared_record(original: Handler) -> Handler:
    """Rule 1 broken: the YES vote leaves before the PREPARED record, which is not forced."""

    def mutant(core: Any, branch: Any, event: Any, now_ms: int) -> list[Any]:
        effects = original(core, branch, event, now_ms)
        sends = [e for e in effects if isinstance(e, Send) and isinstance(e.message, Vote)]
        persists = [Persist(e.record, force=False) for e in effects if isinstance(e, Persist)]
        rest = [e for e in effects if not isinstance(e, Persist) and e not in sends]
        return [*sends, *persists, *rest] if persists else effects

    return mutant


@pytest.mark.parametrize("checks", ["all", "atomicity only"])
def test_explorer_finds_a_yes_vote_before_the_prepared_record(
    monkeypatch: pytest.MonkeyPatch, checks: str
) -> None:
    key = (BranchState.EXECUTING, "BranchExecuted")
    # TRANSITIONS holds the function itself: patching ParticipantCore._executed would not do
    monkeypatch.setitem(TRANSITIONS, key, _vote_before_prepared_record(TRANSITIONS[key]))
    on = ALL_CHECKS if checks == "all" else frozenset({"atomicity"})
    config = Config(checks=on, bounds=Bounds(total_crashes=1, duplicates=0, losses=0))
    result = explorer.explore(config)
    assert result.problem is not None, "the explorer missed a YES vote sent before PREPARED"
    print(result.report())
    if checks == "all":
        assert result.problem.startswith("rule 1")
    else:  # what the broken rule does to the money: one branch commits, the other aborts
        assert result.problem.startswith(("atomicity", "ResourceError"))


@pytest.mark.parametrize("checks", ["all", "atomicity only"])
def test_explorer_finds_a_commit_before_the_committing_record(
    monkeypatch: pytest.MonkeyPatch, checks: str
) -> None:
    original = CoordinatorCore._commit

    def commit_first(self: CoordinatorCore, tx: Any, now_ms: int) -> list[Any]:
        """Rule 2 broken: COMMIT and the answer leave before the COMMITTING record."""
        effects = original(self, tx, now_ms)
        records = [e for e in effects if isinstance(e, Persist)]
        return [e for e in effects if e not in records] + records

    monkeypatch.setattr(CoordinatorCore, "_commit", commit_first)
    on = ALL_CHECKS if checks == "all" else frozenset({"atomicity"})
    config = Config(checks=on, bounds=Bounds(total_crashes=1, duplicates=0, losses=0))
    result = explorer.explore(config)
    assert result.problem is not None, "the explorer missed a COMMIT sent before COMMITTING"
    print(result.report())
    if checks == "all":
        assert result.problem.startswith(("rule 2", "rule 7"))
    else:
        assert result.problem.startswith(("atomicity", "ResourceError"))


def test_explorer_finds_a_driver_that_publishes_before_flushing() -> None:
    """The driver contract (schemas/effects.py): records that precede a Send in an effect list
    are durable before it leaves. A driver that only flushes on forced records loses the lazy
    BEGUN record of a coordinator that crashes after sending PREPAREs; presumed abort then
    answers the YES votes while a resubmission starts the same tx_id afresh."""
    config = Config(
        send_flushes=False, bounds=Bounds(total_crashes=1, duplicates=2, losses=0, timer_fires=0)
    )
    result = explorer.explore(config)
    assert result.problem is not None
    print(result.report())


def test_explorer_finds_a_coordinator_that_presumes_abort_in_one_phase(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The vote COMMITTED may be lost after the branch committed: presuming abort on the vote
    timeout would tell the client "aborted" about a committed branch."""

    def presume(self: CoordinatorCore, tx: Any, reason: str, at_fault: Any, now: int) -> list[Any]:
        return self._abort(tx, reason, at_fault)

    monkeypatch.setattr(CoordinatorCore, "_resolve", presume)
    result = explorer.explore(Config(**ONE, bounds=ONE_PHASE_FAULTS))
    assert result.problem is not None, "the explorer missed a presumed abort in one phase"
    print(result.report())
    assert result.problem.startswith("atomicity")


def test_explorer_finds_a_participant_that_answers_the_question_from_memory_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A branch that committed and was forgotten must answer COMMITTED from its log: a NO from
    an empty memory would abort the transaction in the client's eyes."""
    key = (BranchState.NONE, "Abort:one_phase")
    look_up = TRANSITIONS[key]

    def from_memory(core: Any, branch: Any, event: Any, now_ms: int) -> list[Any]:
        effects = look_up(core, branch, event, now_ms)
        assert effects == [LookUpBranch(branch.tx_id)]
        return TRANSITIONS[BranchState.LOOKING_UP, "BranchHistory"](
            core, branch, BranchHistory(branch.tx_id, []), now_ms
        )

    monkeypatch.setitem(TRANSITIONS, key, from_memory)
    result = explorer.explore(Config(**ONE, bounds=ONE_PHASE_FAULTS))
    assert result.problem is not None, "the explorer missed an answer from memory only"
    print(result.report())
    assert result.problem.startswith(("atomicity", "rule 4"))


def test_explorer_finds_a_participant_that_forgets_early_without_reading_the_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A one-phase branch aborted by the coordinator's question leaves a tombstone, and is
    forgotten at once; its PREPARE, delivered again on its deadline, must find the tombstone.
    Run without reading the log, it commits a transaction the client was told had aborted."""
    key = (BranchState.NONE, "Prepare")
    prepare = TRANSITIONS[key]

    def never_recall(core: Any, branch: Any, event: Any, now_ms: int) -> list[Any]:
        core.recall_until_ms = -1
        return prepare(core, branch, event, now_ms)

    monkeypatch.setitem(TRANSITIONS, key, never_recall)
    result = explorer.explore(FORGETFUL_ONE_PHASE)
    assert result.problem is not None, "the explorer missed a branch forgotten without recall"
    print(result.report())
    assert result.problem.startswith("atomicity")
