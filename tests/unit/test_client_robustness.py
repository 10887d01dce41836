"""The client library: limits checked before sending, envelopes that fit, broker outages waited out.

A fake channel stands in for RabbitMQ (``coordinator.client.AmqpChannel`` is replaced): it
records what is published, can lose its connection and refuse a number of reconnects.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from coordinator import client as client_module
from coordinator.client import (
    AsyncClient,
    Branch,
    Client,
    ClientClosed,
    LimitExceeded,
    OutcomeKind,
    OutcomeUnknown,
)
from runtime import config, outages
from runtime.amqp import Delivery
from runtime.errors import BrokerUnavailable, ConnectionLost, TwophaseError
from schemas.codec import decode_message, encode
from schemas.messages import Begin, Envelope, Outcome, StatusQuery
from schemas.topology import COORDINATOR_QUEUE
from schemas.validation import ENVELOPE_MAX, Limits

SECRET_URL = "amqp://guest:s3cret@broker.example:5672/prod"


class FakeChannel:
    """The part of ``AmqpChannel`` the client uses."""

    def __init__(self, url: str, **_options: object) -> None:
        self.url = url
        self.lock = threading.Lock()
        self.published: list[tuple[str, bytes]] = []
        self.inbox: list[bytes] = []
        self.lost: str | None = None
        self.refuse_reconnects = 0
        self.reconnect_calls: list[float] = []
        self.generation = 1
        self._tag = 0

    def declare_queue(self, name: str, *, durable: bool = True, exclusive: bool = False) -> None:
        pass

    def consume(self, queue: str) -> None:
        pass

    def _check(self) -> None:
        if self.lost is not None:
            raise ConnectionLost(self.lost)

    def poll(self, timeout: float, max_messages: int = 10_000) -> list[Delivery]:
        self._check()
        with self.lock:
            bodies, self.inbox = self.inbox, []
        if not bodies:
            time.sleep(min(timeout, 0.01))
        out = []
        for body in bodies:
            self._tag += 1
            out.append(Delivery(body, {}, "reply", "reply", self._tag, self.generation, False))
        return out

    def ack(self, deliveries: object) -> None:
        self._check()

    def publish(self, queue: str, body: bytes, **_options: object) -> None:
        self._check()
        with self.lock:
            self.published.append((queue, body))

    def take_failures(self) -> list[str]:
        return []

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        self._check()

    def reconnect(self, attempts: int = 1_000_000) -> None:
        self.reconnect_calls.append(time.monotonic())
        if self.refuse_reconnects > 0:
            self.refuse_reconnects -= 1
            raise BrokerUnavailable(
                "cannot reach RabbitMQ at amqp://guest:***@broker.example:5672/prod: "
                "connection refused"
            )
        self.generation += 1
        self.lost = None

    def close(self) -> None:
        pass

    # ---- for the tests -------------------------------------------------------------------

    def messages(self) -> list[Any]:
        """Every protocol message published, envelopes opened."""
        found: list[Any] = []
        with self.lock:
            bodies = [body for _, body in self.published]
        for body in bodies:
            message = decode_message(body)
            if isinstance(message, Envelope):
                found.extend(item.message for item in message.messages)
            else:
                found.append(message)
        return found

    def reply(self, outcome: Outcome) -> None:
        with self.lock:
            self.inbox.append(encode(outcome))


@pytest.fixture
def channels(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeChannel]]:
    made: list[FakeChannel] = []

    def factory(url: str, **options: object) -> FakeChannel:
        made.append(FakeChannel(url, **options))
        return made[-1]

    monkeypatch.setattr(client_module, "AmqpChannel", factory)
    yield made


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


BRANCHES = [Branch("bank-a", "debit", {"account": "a-1", "amount": 5})]


# ---- limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("branches", "options", "limits", "words"),
    [
        ([Branch("bank-a", "debit", {"x": 1})] * 3, {}, Limits(max_branches=2), "3 branches"),
        ([], {}, Limits(), "0 branches"),
        ([Branch("bank-a", "debit", {"blob": "x" * 200})], {}, Limits(max_args_bytes=100), "args"),
        (BRANCHES, {"tx_id": "has space"}, Limits(), "tx_id"),
        (BRANCHES, {"tx_id": "x" * 65}, Limits(), "65 characters"),
        (BRANCHES, {"timeout": 3600.0}, Limits(), "timeout"),
        ([Branch("bank:a", "debit", {})], {}, Limits(), "participant name"),
        ([Branch("bank-a", "de bit", {})], {}, Limits(), "operation name"),
        ([Branch("bank-a", "debit", {"b": "y" * 500})], {}, Limits(max_message_bytes=300), "bytes"),
    ],
)
def test_a_transaction_the_coordinator_would_refuse_is_not_sent(
    channels: list[FakeChannel],
    branches: list[Branch],
    options: dict[str, Any],
    limits: Limits,
    words: str,
) -> None:
    with Client("amqp://fake/", limits=limits) as client:
        with pytest.raises(LimitExceeded, match=words) as info:
            client.submit(branches, **options)
        with pytest.raises(LimitExceeded, match=words):
            client.submit_future(branches, **options)
        time.sleep(0.05)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    assert channels[0].messages() == []


def test_a_closed_client_raises_client_closed(channels: list[FakeChannel]) -> None:
    with Client("amqp://fake/") as client:
        waiting = client.submit_future(BRANCHES)
    with pytest.raises(ClientClosed, match="the client was closed") as failed:
        waiting.result(5)
    with pytest.raises(ClientClosed, match="the client is closed") as refused:
        client.submit_future(BRANCHES)
    for error in (failed.value, refused.value):
        assert isinstance(error, TwophaseError) and isinstance(error, RuntimeError)


def test_status_checks_the_tx_id(channels: list[FakeChannel]) -> None:
    with Client("amqp://fake/", limits=Limits(max_tx_id_length=8)) as client:
        with pytest.raises(LimitExceeded, match="at most 8"):
            client.status("123456789")
        with pytest.raises(LimitExceeded, match="empty"):
            client.status("")
    assert channels[0].messages() == []


def test_the_async_client_checks_the_same_limits(channels: list[FakeChannel]) -> None:
    import asyncio

    async def run() -> None:
        async with AsyncClient("amqp://fake/", limits=Limits(max_branches=1)) as client:
            with pytest.raises(LimitExceeded, match="2 branches"):
                await client.submit(BRANCHES * 2)
            with pytest.raises(LimitExceeded, match="tx_id"):
                await client.status("no spaces allowed")

    asyncio.run(run())
    assert channels[0].messages() == []


def test_generated_tx_ids_fit_a_short_limit(channels: list[FakeChannel]) -> None:
    with Client("amqp://fake/", limits=Limits(max_tx_id_length=12)) as client:
        future = client.submit_future(BRANCHES)
        wait_for(lambda: channels[0].messages())
        assert len(future.tx_id) == 12  # type: ignore[attr-defined]
        future.cancel()


def test_a_transaction_within_the_limits_is_sent(channels: list[FakeChannel]) -> None:
    with Client("amqp://fake/", limits=Limits(max_branches=2)) as client:
        future = client.submit_future(BRANCHES * 2, tx_id="ok-1")
        wait_for(lambda: channels[0].messages())
        channels[0].reply(Outcome(tx_id="ok-1", outcome=OutcomeKind.COMMITTED))
        assert future.result(5).outcome is OutcomeKind.COMMITTED
    [begin] = channels[0].messages()
    assert isinstance(begin, Begin) and begin.tx_id == "ok-1"


# ---- envelopes ---------------------------------------------------------------------------------


def test_envelopes_hold_at_most_envelope_max_messages_and_fit_the_size_limit(
    channels: list[FakeChannel],
) -> None:
    limits = Limits(max_message_bytes=20_000)
    with Client("amqp://fake/", limits=limits) as client:
        channel = channels[0]
        with channel.lock:  # everything queues while the I/O thread waits for the lock
            futures = [
                client.submit_future(BRANCHES, tx_id=f"tx-{i}") for i in range(ENVELOPE_MAX + 50)
            ]
        wait_for(lambda: len(channel.messages()) >= len(futures))
        for future in futures:
            future.cancel()
    bodies = [body for queue, body in channel.published if queue == COORDINATOR_QUEUE]
    assert len(bodies) > 2  # split by count (256) and by size (20 kB)
    for body in bodies:
        assert len(body) <= limits.max_message_bytes
        message = decode_message(body)
        if isinstance(message, Envelope):
            assert len(message.messages) <= ENVELOPE_MAX
    sent = {m.tx_id for m in channel.messages()}
    assert sent == {f"tx-{i}" for i in range(ENVELOPE_MAX + 50)}


# ---- the broker goes away ----------------------------------------------------------------------


def test_a_lost_broker_is_waited_for_with_back_off_and_logged_once_each_way(
    channels: list[FakeChannel], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="twophase")
    with Client(SECRET_URL) as client:
        channel = channels[0]
        future = client.submit_future(BRANCHES, tx_id="tx-outage", timeout=5.0)
        wait_for(lambda: channel.messages())
        status = threading.Thread(target=lambda: _quietly(client.status, "tx-outage", wait=10))
        channel.refuse_reconnects = 4
        channel.lost = "connection reset by the test"
        status.start()
        wait_for(lambda: len(channel.reconnect_calls) == 5, timeout=10)
        wait_for(lambda: sum(isinstance(m, Begin) for m in channel.messages()) >= 2)
        wait_for(lambda: any(isinstance(m, StatusQuery) for m in channel.messages()))
        channel.reply(Outcome(tx_id="tx-outage", outcome=OutcomeKind.COMMITTED))
        assert future.result(5).outcome is OutcomeKind.COMMITTED
        status.join(5)

    calls = channel.reconnect_calls
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
    for i, gap in enumerate(gaps):  # exponential (plus jitter), not a fixed period
        assert gap >= outages.INITIAL_WAIT_S * 2**i * 0.9, gaps
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    lost = [m for m in warnings if "lost RabbitMQ" in m]
    back = [m for m in warnings if "is back after" in m]
    assert len(lost) == 1 and len(back) == 1, warnings
    assert "amqp://guest:***@broker.example:5672/prod" in lost[0]
    assert "connection reset by the test" in lost[0]
    attempts = [r.getMessage() for r in caplog.records if "reconnecting to" in r.getMessage()]
    assert len(attempts) == 4 and all(r.startswith("client ") for r in attempts), attempts
    assert "BrokerUnavailable" in attempts[0] and "retrying in" in attempts[0]
    assert all("s3cret" not in r.getMessage() for r in caplog.records)


def _quietly(call: Callable[..., object], *args: object, **kwargs: object) -> None:
    with contextlib.suppress(OutcomeUnknown):
        call(*args, **kwargs)


def test_a_caller_waits_until_its_own_deadline_while_the_broker_is_away(
    channels: list[FakeChannel],
) -> None:
    with Client("amqp://fake/") as client:
        channel = channels[0]
        channel.refuse_reconnects = 1_000
        channel.lost = "broker stopped"
        started = time.monotonic()
        with pytest.raises(OutcomeUnknown):
            client.submit(BRANCHES, timeout=1.0, wait=1.0)
        assert 0.9 <= time.monotonic() - started < 3.0
        closing = time.monotonic()
    assert time.monotonic() - closing < 2.0  # close() does not sit out the back-off


def test_client_without_url_reads_the_environment(
    channels: list[FakeChannel], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWOPHASE_AMQP_URL", "amqp://u:p@from-env:5672/v")
    with Client() as client:
        assert client.amqp_url == "amqp://u:p@from-env:5672/v"
    monkeypatch.delenv("TWOPHASE_AMQP_URL")
    with Client() as client:
        assert client.amqp_url == config.DEFAULT_AMQP_URL
    assert [c.url for c in channels] == [
        "amqp://u:p@from-env:5672/v",
        config.DEFAULT_AMQP_URL,
    ]
