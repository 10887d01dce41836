"""A driver's protocol timers: the cores ask for them by key, the driver fires them when due."""

from __future__ import annotations

import heapq

from schemas.effects import TimerKey


class Timers:
    """Deadlines by key; cancelled or replaced entries are dropped lazily from the heap, and
    all at once when they outnumber the live ones (a core that forgets a flood of branches
    early cancels their timers long before they are due)."""

    def __init__(self) -> None:
        self._deadline: dict[TimerKey, int] = {}
        self._heap: list[tuple[int, TimerKey]] = []

    def start(self, key: TimerKey, deadline_ms: int) -> None:
        self._deadline[key] = deadline_ms
        heapq.heappush(self._heap, (deadline_ms, key))

    def cancel(self, key: TimerKey) -> None:
        if self._deadline.pop(key, None) is not None and len(self._heap) > 2 * len(self) + 64:
            self._heap = [(d, k) for d, k in self._heap if self._deadline.get(k) == d]
            heapq.heapify(self._heap)

    def due(self, now: int) -> list[TimerKey]:
        fired = []
        while self._heap and self._heap[0][0] <= now:
            deadline, key = heapq.heappop(self._heap)
            if self._deadline.get(key) == deadline:
                del self._deadline[key]
                fired.append(key)
        return fired

    def next_deadline(self) -> int | None:
        while self._heap and self._deadline.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._deadline)
