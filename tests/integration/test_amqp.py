"""runtime.amqp against a real RabbitMQ (TWOPHASE_TEST_AMQP_URL)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import pytest

from runtime.amqp import AmqpChannel, Delivery
from runtime.errors import BrokerUnavailable, ConnectionLost, PublishError
from schemas.topology import DEAD_LETTER_QUEUE, ERROR_HEADER

pytestmark = pytest.mark.integration

URL = os.environ.get("TWOPHASE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _broker_reachable() -> bool:
    try:
        pika.BlockingConnection(pika.URLParameters(URL)).close()
    except (pika.exceptions.AMQPError, OSError):
        return False
    return True


@pytest.fixture(scope="module", autouse=True)
def _require_broker() -> None:
    if not _broker_reachable():
        if os.environ.get("CI"):
            pytest.fail(f"RabbitMQ is not reachable at {URL}")
        pytest.skip(f"RabbitMQ is not reachable at {URL}")


@pytest.fixture
def admin() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A plain pika channel for inspecting and cleaning up, independent of the code under test."""
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    yield connection.channel()
    connection.close()


@pytest.fixture
def queue(admin: pika.adapters.blocking_connection.BlockingChannel) -> Iterator[str]:
    name = f"test.amqp.{uuid.uuid4().hex}"
    yield name
    admin.queue_delete(name)


@pytest.fixture
def chan() -> Iterator[AmqpChannel]:
    channel = AmqpChannel(URL, connection_name=f"test-amqp-{uuid.uuid4().hex}", prefetch=1000)
    yield channel
    channel.close()


def _message_count(admin: pika.adapters.blocking_connection.BlockingChannel, name: str) -> int:
    return int(admin.queue_declare(name, passive=True).method.message_count)


def _poll_until(chan: AmqpChannel, count: int, timeout: float = 10.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += chan.poll(timeout=0.5)
    return got


def test_pipelined_publish_consume_ack(
    chan: AmqpChannel, queue: str, admin: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    chan.declare_queue(queue)
    for i in range(500):
        chan.publish(queue, f"m{i}".encode(), headers={"n": str(i)})
    chan.wait_for_confirms(timeout=10)
    assert _message_count(admin, queue) == 500

    chan.consume(queue)
    got = _poll_until(chan, 500)
    assert sorted(d.body for d in got) == sorted(f"m{i}".encode() for i in range(500))
    assert all(d.queue == queue and d.routing_key == queue for d in got)
    assert all(d.headers == {"n": d.body.decode()[1:]} for d in got)
    assert all(d.generation == chan.generation and not d.redelivered for d in got)
    chan.ack(got)
    chan.wait_for_confirms()  # flushes I/O
    chan.close()
    assert _message_count(admin, queue) == 0


def test_publishes_only_leave_when_confirms_are_awaited(
    chan: AmqpChannel, queue: str, admin: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    """A publish buffers its frames; the batch leaves in one write to pika's transport (which
    sends each write with one system call), and is confirmed, in one wait."""
    chan.declare_queue(queue)
    link: Any = chan._link
    [stream] = link._services.streams
    transport = stream.held._pika_stream
    writes: list[int] = []
    write = transport.write

    def counted(data: bytes) -> None:
        writes.append(len(data))
        write(data)

    transport.write = counted
    for i in range(20):
        chan.publish(queue, f"m{i}".encode())
    assert _message_count(admin, queue) == 0
    chan.wait_for_confirms(timeout=10)
    assert len(writes) == 1
    assert _message_count(admin, queue) == 20


def test_queue_counts_of_a_missing_queue_is_none_without_a_warning(
    chan: AmqpChannel, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    missing = f"test.amqp.no-such-queue.{uuid.uuid4().hex}"
    with caplog.at_level(logging.WARNING):
        assert chan.queue_counts(missing) is None
    assert not [r for r in caplog.records if r.name.startswith("pika")]
    chan.declare_queue(queue)
    assert chan.queue_counts(queue) == (0, 0)


def test_poll_timeout_returns_empty(chan: AmqpChannel, queue: str) -> None:
    chan.declare_queue(queue)
    chan.consume(queue)
    start = time.monotonic()
    assert chan.poll(timeout=0.3) == []
    assert 0.25 <= time.monotonic() - start < 2.0
    assert chan.poll(timeout=0) == []


def test_unroutable_publish_raises_publish_error(chan: AmqpChannel, queue: str) -> None:
    chan.declare_queue(queue)
    missing = f"test.amqp.no-such-queue.{uuid.uuid4().hex}"
    chan.publish(queue, b"ok")
    chan.publish(missing, b"lost")
    chan.publish(queue, b"ok too")
    with pytest.raises(PublishError) as info:
        chan.wait_for_confirms(timeout=10)
    assert info.value.routing_keys == [missing]
    assert missing in str(info.value)
    # The channel is still usable afterwards.
    chan.publish(queue, b"after")
    chan.wait_for_confirms(timeout=10)


def _take_own_dead_letter(
    admin: pika.adapters.blocking_connection.BlockingChannel, body: bytes
) -> pika.spec.BasicProperties | None:
    """Find our message in the shared DLQ; other messages stay unacked and are requeued on close."""
    channel = admin.connection.channel()
    try:
        while True:
            method, props, got = channel.basic_get(DEAD_LETTER_QUEUE, auto_ack=False)
            if method is None:
                return None
            if got == body:
                channel.basic_ack(method.delivery_tag)
                return props
    finally:
        channel.close()


def test_dead_letter(
    chan: AmqpChannel, queue: str, admin: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    chan.declare_queue(queue)
    body = f"poison-{uuid.uuid4().hex}".encode()
    chan.publish(queue, body, headers={"traceparent": "00-abc-def-01"})
    chan.wait_for_confirms()
    chan.consume(queue)
    [delivery] = _poll_until(chan, 1)
    chan.dead_letter(delivery, "undecodable: " + "x" * 2000)

    props = _take_own_dead_letter(admin, body)
    assert props is not None, "dead-lettered message not found in the DLQ"
    assert props.headers[ERROR_HEADER] == ("undecodable: " + "x" * 2000)[:1000]
    assert props.headers["x-original-routing-key"] == queue
    assert props.headers["traceparent"] == "00-abc-def-01"
    chan.close()
    assert _message_count(admin, queue) == 0


def test_ack_from_old_generation_is_ignored(
    chan: AmqpChannel, queue: str, admin: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    chan.declare_queue(queue)
    chan.consume(queue)
    chan.publish(queue, b"once")
    chan.wait_for_confirms()
    [old] = _poll_until(chan, 1)
    first_generation = chan.generation

    chan.reconnect(attempts=5)
    assert chan.generation == first_generation + 1
    chan.ack([old])  # ignored: that tag belongs to the dead channel

    [again] = _poll_until(chan, 1)
    assert again.body == b"once"
    assert again.redelivered
    assert again.generation == chan.generation
    chan.ack([again])
    chan.close()
    assert _message_count(admin, queue) == 0


def test_ack_uses_individual_acks_for_gaps(
    chan: AmqpChannel, queue: str, admin: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    chan.declare_queue(queue)
    chan.consume(queue)
    for i in range(6):
        chan.publish(queue, str(i).encode())
    chan.wait_for_confirms()
    got = sorted(_poll_until(chan, 6), key=lambda d: d.delivery_tag)
    chan.ack([got[0], got[2], got[4]])  # gaps: must not ack 1, 3
    chan.ack([got[5]])
    chan.close()  # the unacked ones are requeued
    time.sleep(0.2)
    assert _message_count(admin, queue) == 2


def test_broker_unavailable_has_one_line_redacted_message() -> None:
    url = "amqp://guest:s3cret@127.0.0.1:1/"
    with pytest.raises(BrokerUnavailable) as info:
        AmqpChannel(url, connect_attempts=2)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/: ")
    assert "s3cret" not in message


def _close_connection_by_name(name: str) -> bool:
    """Force-close our connection through rabbitmqctl; False if that is not possible here."""
    if shutil.which("rabbitmqctl") is None:
        return False
    needle = f'{{"connection_name","{name}"}}'
    for _ in range(20):  # the connection may take a moment to be listed
        listing = subprocess.run(
            ["rabbitmqctl", "list_connections", "pid", "client_properties", "-q"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if listing.returncode != 0:
            return False
        pids = [line.split("\t", 1)[0] for line in listing.stdout.splitlines() if needle in line]
        if pids:
            for pid in pids:
                subprocess.run(
                    ["rabbitmqctl", "close_connection", pid, "test_amqp forced close"],
                    capture_output=True,
                    timeout=30,
                    check=True,
                )
            return True
        time.sleep(0.1)
    return False


def test_connection_lost_when_force_closed(queue: str) -> None:
    name = f"test-amqp-{uuid.uuid4().hex}"
    chan = AmqpChannel(URL, connection_name=name)
    try:
        chan.declare_queue(queue)
        chan.consume(queue)
        if not _close_connection_by_name(name):
            # No broker CLI here (e.g. remote broker): cut the TCP connection under pika instead,
            # through pika internals (in this test only)
            import socket

            link: Any = chan._link
            link.connection._transport._sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(ConnectionLost):
            for _ in range(50):
                chan.poll(timeout=0.2)
        with pytest.raises(ConnectionLost):
            chan.publish(queue, b"x")
        with pytest.raises(ConnectionLost):
            chan.wait_for_confirms(timeout=1)

        chan.reconnect(attempts=20)
        chan.publish(queue, b"after reconnect")
        chan.wait_for_confirms()
        [delivery] = _poll_until(chan, 1)
        assert delivery.body == b"after reconnect"
        chan.ack([delivery])
    finally:
        chan.close()


def test_call_threadsafe_wakes_poll(chan: AmqpChannel, queue: str) -> None:
    import threading

    chan.declare_queue(queue)
    chan.consume(queue)
    ran = threading.Event()
    threading.Timer(0.2, lambda: chan.call_threadsafe(ran.set)).start()
    start = time.monotonic()
    assert chan.poll(timeout=5) == []
    assert ran.is_set()
    assert time.monotonic() - start < 2.0
