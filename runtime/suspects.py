"""Messages whose handling raised, remembered across redeliveries until they pass or are poison.

A redelivered message gets a new delivery tag, so a message is known by a digest of its routing
key and body. The driver blames the message being handled when a batch fails (or the whole batch
when the failure cannot be pinned on one), handles suspects one per batch so that the culprit is
found, and dead-letters a message that failed :data:`POISON_ATTEMPTS` times.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

from runtime.amqp import Delivery

#: a message whose handling raised this many times is dead-lettered as poison
POISON_ATTEMPTS = 3
#: how many suspects are remembered at most (the oldest are forgotten first)
SUSPECTS_MAX = 10_000


def digest(delivery: Delivery) -> bytes:
    """Who a delivery is, across redeliveries."""
    key = hashlib.blake2b(delivery.routing_key.encode(), digest_size=16)
    key.update(delivery.body)
    return key.digest()


class Suspects:
    def __init__(self, attempts: int = POISON_ATTEMPTS, remembered: int = SUSPECTS_MAX) -> None:
        self.attempts, self.remembered = attempts, remembered
        self._failures: OrderedDict[bytes, tuple[int, str]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._failures)

    def __contains__(self, delivery: Delivery) -> bool:
        return bool(self._failures) and digest(delivery) in self._failures

    def blame(self, deliveries: Iterable[Delivery], error: str) -> None:
        for delivery in deliveries:
            key = digest(delivery)
            times = self._failures.pop(key, (0, ""))[0] + 1
            self._failures[key] = (times, error)
        while len(self._failures) > self.remembered:
            self._failures.popitem(last=False)

    def poison(self, delivery: Delivery) -> str | None:
        """Why ``delivery`` is poison, or None while it may be tried again."""
        if not self._failures:
            return None
        times, error = self._failures.get(digest(delivery), (0, ""))
        if times < self.attempts:
            return None
        return f"handling it raised {times} times, last: {error}"

    def cleared(self, deliveries: Iterable[Delivery]) -> None:
        """``deliveries`` were handled without raising: no longer suspect."""
        if self._failures:
            for delivery in deliveries:
                self._failures.pop(digest(delivery), None)
