"""The AMQP side of the boundary against a real RabbitMQ: a bounded dead-letter queue, a publish
that cannot be framed, and dead-lettering many messages with one confirm wait."""

from __future__ import annotations

import logging
import time

import pika
import pytest

from runtime import amqp
from runtime.amqp import AmqpChannel
from runtime.errors import PublishRefused
from schemas import topology
from schemas.topology import DEAD_LETTER_QUEUE, ERROR_HEADER

pytestmark = pytest.mark.integration


def _admin(amqp_url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(amqp_url))


def test_the_dead_letter_queue_is_declared_with_its_bounds(amqp_url: str) -> None:
    AmqpChannel(amqp_url).close()
    connection = _admin(amqp_url)
    try:
        channel = connection.channel()
        # A passive declare does not show arguments; a declare with other arguments is refused
        # (406), and one with the same is accepted: that is how the bounds are read here.
        channel.queue_declare(
            DEAD_LETTER_QUEUE, durable=True, arguments=topology.dead_letter_queue_arguments()
        )
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.queue_declare(DEAD_LETTER_QUEUE, durable=True)
        assert refused.value.reply_code == 406
    finally:
        connection.close()


def test_an_unbounded_dead_letter_queue_of_an_older_version_is_used_with_a_warning(
    amqp_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(amqp, "_warned_unbounded", [])  # warned once per process
    connection = _admin(amqp_url)
    connection.channel().queue_declare(DEAD_LETTER_QUEUE, durable=True)  # no arguments
    connection.close()
    with caplog.at_level(logging.WARNING, logger="twophase.amqp"):
        channel = AmqpChannel(amqp_url)
    try:
        channel.declare_queue("twophase.participant.bank-a")
        assert any("without its bounds" in r.getMessage() for r in caplog.records)
    finally:
        channel.close()


def test_a_routing_key_amqp_cannot_carry_is_refused_and_the_connection_stays(
    amqp_url: str,
) -> None:
    channel = AmqpChannel(amqp_url)
    try:
        queue = "twophase.client.fine"
        channel.declare_queue(queue, exclusive=True)
        with pytest.raises(PublishRefused):
            channel.publish("twophase.client." + "x" * 300, b"{}")
        channel.publish(queue, b"after")
        channel.wait_for_confirms()
        channel.consume(queue)
        deadline = time.monotonic() + 5
        got: list[bytes] = []
        while not got and time.monotonic() < deadline:
            got = [d.body for d in channel.poll(0.2)]
        assert got == [b"after"]
        assert channel.generation == 1  # never reconnected
    finally:
        channel.close()


def test_many_rejected_messages_are_dead_lettered_with_their_reasons(amqp_url: str) -> None:
    channel = AmqpChannel(amqp_url)
    try:
        queue = topology.COORDINATOR_QUEUE
        channel.declare_queue(queue)
        for i in range(20):
            channel.publish(queue, f"bad {i}".encode())
        channel.wait_for_confirms()
        channel.consume(queue)
        deliveries: list[amqp.Delivery] = []
        deadline = time.monotonic() + 5
        while len(deliveries) < 20 and time.monotonic() < deadline:
            deliveries += channel.poll(0.2)
        channel.dead_letter_many([(d, f"invalid: number {i}") for i, d in enumerate(deliveries)])
        assert channel.queue_counts(queue) == (0, 1)
        dead = channel.queue_counts(DEAD_LETTER_QUEUE)
        assert dead is not None and dead[0] == 20
    finally:
        channel.close()
    connection = _admin(amqp_url)
    try:
        reasons = []
        admin = connection.channel()
        for _ in range(20):
            _method, props, _body = admin.basic_get(DEAD_LETTER_QUEUE, auto_ack=True)
            reasons.append(props.headers[ERROR_HEADER])
        assert sorted(reasons) == sorted(f"invalid: number {i}" for i in range(20))
    finally:
        connection.close()
