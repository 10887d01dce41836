"""``twophase fuzz`` on the real RabbitMQ and PostgreSQL: the chaos bank under 2,000 hostile
messages passes every check; and the hostile inputs it found, one by one."""

from __future__ import annotations

import time
from pathlib import Path

import pika
import pytest

from runtime.amqp import AmqpChannel
from runtime.errors import ConnectionLost
from schemas import topology
from twophase.chaos_faults import Broker
from twophase.fuzz import FuzzConfig, run_fuzz
from twophase.fuzz_traffic import near_frame_max
from twophase.testing import running_coordinator

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_the_bank_passes_every_check_under_2000_hostile_messages(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    result = run_fuzz(FuzzConfig(amqp_url, pg_url, tmp_path, messages=2_000, seed=12))
    failed = {c.name: c.detail for c in result.checks if not c.ok}
    assert not failed, failed
    report = result.as_dict()
    assert report["sent"]["messages"] == 2_000
    assert report["dead_letters"]["mismatches"] == 0
    assert set(report["dead_letters"]["found"]) <= {"oversized", "undecodable", "invalid"}


def _dead_letters(amqp_url: str) -> list[tuple[bytes, dict[str, object]]]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        found: list[tuple[bytes, dict[str, object]]] = []
        while True:
            method, props, body = channel.basic_get(topology.DEAD_LETTER_QUEUE, auto_ack=True)
            if method is None:
                return found
            found.append((body, dict(props.headers or {})))
    finally:
        connection.close()


def test_a_refused_message_with_headers_near_the_frame_size_is_dead_lettered(
    amqp_url: str, tmp_path: Path
) -> None:
    """Found by ``twophase fuzz`` (header kind ``near-frame-max``): the dead-letter copy adds
    ``x-twophase-error`` and ``x-original-routing-key`` to the message's own headers; past the
    broker's frame_max (131,072 bytes) the broker closes the service's connection (501
    FRAME_ERROR), the message comes back, and the service reconnects in a loop with its whole
    queue stuck behind it."""
    with running_coordinator(amqp_url, str(tmp_path / "coordinator.db")) as service:
        AmqpChannel(amqp_url).close()  # the dead-letter queue exists before anything is refused
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            channel = connection.channel()
            for body, props in (
                (b"{not json", near_frame_max({"x-case": "big"})),
                (b"{after", pika.BasicProperties(headers={"x-case": "after"})),
            ):
                channel.basic_publish(topology.EXCHANGE, topology.COORDINATOR_QUEUE, body, props)
        finally:
            connection.close()
        deadline = time.monotonic() + 10
        found: list[tuple[bytes, dict[str, object]]] = []
        while time.monotonic() < deadline and len(found) < 2:
            found += _dead_letters(amqp_url)
            time.sleep(0.2)
        bodies = sorted(body for body, _ in found)
        assert bodies == [b"{after", b"{not json"], f"reconnects: {service.stats.reconnects}"
        assert all(
            str(headers.get(topology.ERROR_HEADER, "")).startswith("undecodable: ")
            for _, headers in found
        )
        assert service.stats.reconnects == 0


def test_queue_counts_on_a_dropped_connection_raises_connection_lost(amqp_url: str) -> None:
    """Found by ``twophase fuzz`` when the broker went down under it: ``chaos._wait_quiet``
    (and ``ServiceGroup.wait_ready``) handle ``ConnectionLost``, but ``queue_counts`` opens its
    probe channel outside ``_io()``, so pika's own ``ConnectionClosedByBroker`` /
    ``StreamLostError`` escape and end the caller."""
    channel = AmqpChannel(amqp_url, connection_name="twophase-fuzz-counted")
    try:
        channel.declare_queue(topology.COORDINATOR_QUEUE)
        (pid,) = [
            p for p, name in Broker(amqp_url).connections() if name == "twophase-fuzz-counted"
        ]
        assert Broker(amqp_url).kick(pid)
        time.sleep(0.5)
        with pytest.raises(ConnectionLost):
            channel.queue_counts(topology.COORDINATOR_QUEUE)
    finally:
        channel.close()
