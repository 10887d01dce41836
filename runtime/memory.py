"""In-memory test doubles: a broker and a channel with the interface of ``AmqpChannel``.

They let the real drivers (coordinator service, participant worker) run without RabbitMQ, in one
thread, stepped turn by turn, so a test can assert on what a batch persisted, published and acked,
drop the broker's connection at a chosen moment, or feed garbage. Semantics kept from RabbitMQ:
durable queues, manual acks, redelivery (``redelivered=True``) of what a closed channel left
unacked, ``mandatory`` returns for a missing queue, and the dead-letter queue.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from runtime.amqp import Delivery, dead_letter_headers
from runtime.errors import ConnectionLost, PublishError
from schemas.topology import DEAD_LETTER_QUEUE


@dataclass
class _Message:
    body: bytes
    headers: dict[str, str]
    routing_key: str
    redelivered: bool = False


@dataclass
class MemoryBroker:
    queues: dict[str, deque[_Message]] = field(default_factory=dict)
    published: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.queues.setdefault(DEAD_LETTER_QUEUE, deque())

    def channel(self, *_args: object, **_kwargs: object) -> MemoryChannel:
        """Usable as a channel factory: ``broker.channel(url, prefetch=..., ...)``."""
        return MemoryChannel(self)

    def depth(self, queue: str) -> int:
        with self.lock:
            return len(self.queues.get(queue, ()))

    def bodies(self, queue: str) -> list[bytes]:
        with self.lock:
            return [m.body for m in self.queues.get(queue, ())]


class MemoryChannel:
    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.generation = 1
        self._consumed: list[str] = []
        self._unacked: dict[int, tuple[str, _Message]] = {}
        self._next_tag = 1
        self._returned: list[str] = []
        self._lost: str | None = None
        self.acked = 0

    # -- the AmqpChannel interface ---------------------------------------------------------

    def declare_queue(self, name: str, *, durable: bool = True, exclusive: bool = False) -> None:
        with self.broker.lock:
            self.broker.queues.setdefault(name, deque())

    def queue_counts(self, name: str) -> tuple[int, int] | None:
        with self.broker.lock:
            queue = self.broker.queues.get(name)
            return None if queue is None else (len(queue), 1)

    def hold(self, lock: str) -> None:
        """Locks are not modelled: tests restart a service on the same broker while the old
        channel object lives on (tests/integration/test_single_instance.py has the real one)."""

    def take_lock_contested(self) -> bool:
        return False

    def consume(self, queue: str) -> None:
        if queue not in self._consumed:
            self._consumed.append(queue)

    def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
        persistent: bool = True,
        mandatory: bool = True,
    ) -> None:
        self._check()
        with self.broker.lock:
            queue = self.broker.queues.get(routing_key)
            if queue is None:
                if mandatory:
                    self._returned.append(routing_key)
                return
            queue.append(_Message(body, dict(headers or {}), routing_key))
            self.broker.published += 1

    def wait_for_confirms(self, timeout: float = 30.0) -> None:
        self._check()
        returned, self._returned = self._returned, []
        if returned:
            raise PublishError(returned)

    def take_failures(self) -> list[str]:
        returned, self._returned = self._returned, []
        return returned

    def poll(self, timeout: float, max_messages: int = 10_000) -> list[Delivery]:
        self._check()
        out: list[Delivery] = []
        with self.broker.lock:
            for name in self._consumed:
                queue = self.broker.queues.setdefault(name, deque())
                while queue and len(out) < max_messages:
                    message = queue.popleft()
                    tag = self._next_tag
                    self._next_tag += 1
                    self._unacked[tag] = (name, message)
                    out.append(
                        Delivery(
                            body=message.body,
                            headers=message.headers,
                            routing_key=message.routing_key,
                            queue=name,
                            delivery_tag=tag,
                            generation=self.generation,
                            redelivered=message.redelivered,
                        )
                    )
        return out

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        self._check()
        for delivery in deliveries:
            if delivery.generation != self.generation:
                continue  # a tag of a dead channel is never acked on a new one
            if self._unacked.pop(delivery.delivery_tag, None) is not None:
                self.acked += 1

    def dead_letter(self, delivery: Delivery, reason: str, timeout: float = 30.0) -> None:
        self.dead_letter_many([(delivery, reason)], timeout)

    def dead_letter_many(
        self, rejected: Sequence[tuple[Delivery, str]], timeout: float = 30.0
    ) -> None:
        self._check()
        current = [(d, r) for d, r in rejected if d.generation == self.generation]
        with self.broker.lock:
            for delivery, reason in current:
                headers = dead_letter_headers(delivery, reason)
                self.broker.queues[DEAD_LETTER_QUEUE].append(
                    _Message(delivery.body, headers, delivery.routing_key)
                )
        self.ack([d for d, _ in current])

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        fn()

    def drop_connection(self, why: str = "dropped by the test") -> None:
        """What a broker kick does: unacked messages go back, redelivered; calls now fail."""
        self._lost = why
        self._requeue()

    def reconnect(self, attempts: int = 1_000_000) -> None:
        self._requeue()
        self._lost = None
        self._returned = []
        self.generation += 1

    def close(self) -> None:
        self._requeue()
        self._lost = "closed by the application"

    # -- helpers -------------------------------------------------------------------------

    def _check(self) -> None:
        if self._lost is not None:
            raise ConnectionLost(self._lost)

    def _requeue(self) -> None:
        with self.broker.lock:
            for tag in sorted(self._unacked, reverse=True):
                name, message = self._unacked.pop(tag)
                message.redelivered = True
                self.broker.queues[name].appendleft(message)
