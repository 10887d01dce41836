"""The model of partition ownership by lease with fencing (tests/model/lease_model.py).

* exhaustive: two instances, one or two transactions, leases of 2 or 3 ticks expiring at any
  moment, pauses of any length within the time horizon, crashes and restarts: no transaction is
  decided twice or both ways, nothing is published that is not logged, one writer at a time;
* clocks are for liveness only: acquires that ignore the expiry are still safe;
* the model reaches the states that matter (a stale owner's write refused, a decision published
  by an owner that lost its lease, ...), and a fault-free run decides and publishes everything;
* mutations: break one rule of the protocol and the explorer must find the violation, with a
  shortest trace: a log write without the epoch check (the issue's required one), an epoch check
  and append without a lock between them, a decision published before its write, consuming before
  recovering, an acquire that keeps the epoch, recovery from a read taken before the acquire, an
  inquiry answered with a presumed abort from a read.
"""

from __future__ import annotations

import time

import pytest

from tests.model import lease_model
from tests.model.lease_model import ALL_CHECKS, COMMIT, Config

TWO = ("t1", "t2")

#: Each well under a minute on one core; states counted when written (see docs/architecture.md §12)
PROFILES: dict[str, tuple[Config, int]] = {
    "one transaction; TTL 2, 8 ticks, 4 acquires, 2 crashes each": (
        Config(ttl=2, max_clock=8, acquisitions=4, crashes=2),
        41_459,
    ),
    "one transaction; TTL 3, 9 ticks, 4 acquires, 2 crashes each": (
        Config(ttl=3, max_clock=9, acquisitions=4, crashes=2),
        27_184,
    ),
    "two transactions; TTL 2, 6 ticks, 3 acquires, 1 crash each": (
        Config(transactions=TWO, ttl=2, max_clock=6, acquisitions=3, crashes=1),
        288_537,
    ),
    "two transactions; TTL 3, 8 ticks, 3 acquires, 1 crash each": (
        Config(transactions=TWO, ttl=3, max_clock=8, acquisitions=3, crashes=1),
        422_451,
    ),
}


@pytest.mark.parametrize("name", PROFILES)
def test_exhaustive_ownership_is_safe(name: str) -> None:
    config, expected = PROFILES[name]
    started = time.monotonic()
    result = lease_model.explore(config)
    assert result.problem is None, f"{name}\n{result.report()}"
    print(f"{name}: {result.states} states, {result.settled} settled, ", end="")
    print(f"{time.monotonic() - started:.1f} s")
    assert result.settled > 0
    assert result.states == expected  # a change in the model shows here: update the docs too


def test_safety_does_not_rest_on_clocks() -> None:
    """L9: acquires that ignore the expiry (a clock gone wrong, a lease taken early) cost
    liveness, never safety: the epoch is the fence, not the time."""
    result = lease_model.explore(Config(steal=True))
    assert result.problem is None, result.report()
    print(f"acquires ignore the expiry: {result.states} states")


def test_the_model_reaches_the_states_that_matter() -> None:
    result = lease_model.explore(Config())
    assert result.reached == {
        "two instances believe they own the partition",
        "a stale owner's write refused",
        "a decision published by an owner that lost its lease",
        "a COMMIT logged under an earlier epoch re-sent",
        "recovery aborts an undecided transaction",
        "a transaction decided COMMIT",
        "a transaction decided ABORT",
    }


def test_without_faults_everything_is_decided_and_published() -> None:
    config = Config(transactions=TWO)
    problem, lines = lease_model.settle(config, lease_model.initial(config))
    assert problem is None, "\n".join(lines)
    print("\n".join(lines))
    assert any(line.endswith(f"publishes {COMMIT} t2") for line in lines)


# ---- mutations: break a rule, and the explorer must find it -----------------------------------

#: mutation -> (the rule it breaks, what the full checks report first)
MUTATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "unfenced-write": ("L5", ("single-writer",)),
    "unlocked-fence": ("L5", ("logged",)),
    "publish-before-write": ("L7", ("durable",)),
    "skip-recovery": ("L4", ("logged",)),
    "same-epoch": ("L2", ("single-writer",)),
    "read-before-acquire": ("L3", ("logged",)),
    "presume-abort-on-read": ("L7", ("durable",)),
}
assert set(MUTATIONS) == lease_model.MUTATIONS


@pytest.mark.parametrize("checks", ["all", "published only"])
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_explorer_finds_a_broken_rule(mutation: str, checks: str) -> None:
    """With every check, the first one the mutation breaks; with only what participants see
    (and no settling), that COMMIT and ABORT of one transaction were both sent."""
    rule, first = MUTATIONS[mutation]
    on = ALL_CHECKS if checks == "all" else frozenset({"published"})
    result = lease_model.explore(Config(mutation=mutation, checks=on, settle=checks == "all"))
    assert result.problem is not None, f"the explorer missed {mutation} ({rule})"
    print(f"{mutation} ({rule}), {result.states} states")
    print(result.report())
    expected = first if checks == "all" else ("published",)
    assert result.problem.startswith(expected)


def test_the_issue_s_mutation_a_log_write_without_the_epoch_check() -> None:
    """The issue's required mutation, shown by what it does to decisions alone: a paused owner
    whose write is not fenced commits what the new owner's recovery aborted."""
    result = lease_model.explore(
        Config(mutation="unfenced-write", checks=frozenset({"logged"}), settle=False)
    )
    assert result.problem is not None
    print(result.report())
    assert result.problem.startswith("logged")
    assert any("(recovery)" in line for line in result.trace)
