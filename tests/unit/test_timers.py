"""The drivers' timers: due in deadline order, cancelled and replaced ones never fire, and
cancelled entries do not pile up in the heap (a flood of forgotten branches cancels many)."""

from __future__ import annotations

from runtime.timers import Timers


def test_timers_fire_when_due_in_order_and_only_their_latest_deadline() -> None:
    timers = Timers()
    timers.start(("forget", "b"), 20)
    timers.start(("forget", "a"), 10)
    timers.start(("inquire", "a"), 15)
    timers.start(("inquire", "a"), 30)  # replaced: only the later deadline counts
    timers.cancel(("forget", "b"))
    assert timers.next_deadline() == 10
    assert timers.due(25) == [("forget", "a")]
    assert timers.next_deadline() == 30
    assert timers.due(30) == [("inquire", "a")]
    assert len(timers) == 0 and timers.next_deadline() is None


def test_cancelled_timers_do_not_pile_up_in_the_heap() -> None:
    timers = Timers()
    timers.start(("inquire", "kept"), 5)
    for n in range(15_000):
        timers.start(("forget", f"forged-{n}"), 60_000 + n)
        timers.cancel(("forget", f"forged-{n}"))
    assert len(timers) == 1
    assert len(timers._heap) <= 2 * len(timers) + 65
    assert timers.due(10**9) == [("inquire", "kept")]
