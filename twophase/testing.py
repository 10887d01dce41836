"""Helpers for tests of applications built on twophase (and of twophase itself).

``running_coordinator`` runs a real coordinator service in a thread; ``ProtocolPeer`` speaks the
wire protocol directly, so a test can play the coordinator towards a participant (or a participant
towards the coordinator) and publish duplicates, reorderings and garbage at will.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import msgspec

from coordinator.core import CoordinatorSettings
from coordinator.service import CoordinatorConfig, CoordinatorService
from runtime.amqp import AmqpChannel, Delivery
from schemas.codec import decode_message, encode
from schemas.messages import Envelope, Heartbeat, Protocol

M = TypeVar("M")


@contextmanager
def running_coordinator(
    amqp_url: str, log_url: str, settings: CoordinatorSettings | None = None
) -> Iterator[CoordinatorService]:
    # a test harness: its ProtocolPeer speaks the protocol unsigned, so the coordinator has no key
    service = CoordinatorService.connect(
        CoordinatorConfig(
            amqp_url, log_url, settings=settings or CoordinatorSettings(), insecure=True
        )
    )
    thread = threading.Thread(
        target=service.serve_forever, name="twophase-coordinator", daemon=True
    )
    thread.start()
    try:
        yield service
    finally:
        service.stop()
        thread.join(10)


def unwrap(deliveries: list[Delivery]) -> list[Protocol]:
    """The protocol messages in ``deliveries``, envelopes opened."""
    found: list[Protocol] = []
    for delivery in deliveries:
        message = decode_message(delivery.body)
        if isinstance(message, Envelope):
            found += [item.message for item in message.messages]
        else:
            found.append(message)
    return found


class ProtocolPeer:
    """Consumes one queue and publishes raw protocol messages (one thread only)."""

    def __init__(self, amqp_url: str, queue: str) -> None:
        self.channel = AmqpChannel(amqp_url, connection_name="twophase-test-peer")
        self.channel.declare_queue(queue)
        self.channel.consume(queue)
        self.received: list[Protocol] = []

    def declare(self, queue: str) -> None:
        self.channel.declare_queue(queue)

    def send(self, queue: str, message: msgspec.Struct | bytes) -> None:
        body = message if isinstance(message, bytes) else encode(message)
        self.channel.publish(queue, body)
        self.channel.wait_for_confirms()

    def expect(self, kind: type[M], *, timeout: float = 10.0, **fields: object) -> M:
        """The next received message of ``kind`` whose attributes match ``fields``."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.received:
                if isinstance(message, kind) and all(
                    getattr(message, k) == v for k, v in fields.items()
                ):
                    self.received.remove(message)
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no {kind.__name__} with {fields} within {timeout} s; got {self.received}"
                )
            deliveries = self.channel.poll(min(remaining, 0.2))
            self.received += unwrap(deliveries)
            self.channel.ack(deliveries)

    def quiet(self, seconds: float) -> list[Protocol]:
        """Every protocol message received during ``seconds`` (heartbeats left out)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            deliveries = self.channel.poll(remaining)
            self.received += unwrap(deliveries)
            self.channel.ack(deliveries)
        got, self.received = self.received, []
        return [m for m in got if not isinstance(m, Heartbeat)]

    def close(self) -> None:
        self.channel.close()
