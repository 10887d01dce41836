"""RabbitMQ access for one thread: one BlockingConnection, one channel with pipelined confirms.

Publishes do not wait; ``wait_for_confirms`` waits once for a whole batch. After a disconnect every
call raises ``ConnectionLost`` until ``reconnect()``, which starts a new *generation*: delivery tags
of an older generation are never acked. Other threads may only use ``call_threadsafe``.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import takewhile
from typing import Any

import pika
import pika.exceptions
import pika.spec
import tenacity

from runtime.errors import BrokerUnavailable, ConnectionLost, PublishError, PublishRefused
from runtime.redaction import redact_url
from schemas.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    ERROR_HEADER,
    EXCHANGE,
    dead_letter_queue_arguments,
    durable_queue_arguments,
)

__all__ = ["AmqpChannel", "Delivery"]

log = logging.getLogger("twophase.amqp")

#: Header stamped on every publish with its channel delivery number, so a ``basic.return`` can be
#: matched to the publish it belongs to. Stripped from :class:`Delivery` headers.
SEQ_HEADER = "x-twophase-seq"
ORIGINAL_KEY_HEADER = "x-original-routing-key"
HEARTBEAT_SECONDS = 30
BLOCKED_CONNECTION_TIMEOUT_SECONDS = 300.0
_SETUP_TIMEOUT_SECONDS = 30.0
_RETRYABLE = (pika.exceptions.AMQPError, OSError)
_SHORTSTR_MAX = 255  # bytes of an AMQP short string: routing keys, queue names


@dataclass(frozen=True)
class Delivery:
    body: bytes
    headers: dict[str, str]
    routing_key: str
    queue: str
    delivery_tag: int
    generation: int
    redelivered: bool


_PLAIN_CAUSES = {
    "Connection refused": "connection refused",
    "ACCESS_REFUSED": "access refused (check the user and password)",
    "Name or service not known": "unknown host",
    "NOT_ALLOWED": "access to the virtual host refused",
    "timed out": "connection timed out",
}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or repr(exc)
    for marker, plain in _PLAIN_CAUSES.items():
        if marker in text:
            return plain
    return f"{type(exc).__name__}: {text}"


#: the original headers a dead-letter copy keeps at most: a copy whose header frame exceeds the
#: broker's frame size (128 KiB) makes the broker close the connection, and the message would come
#: back to fail again, forever
_KEPT_HEADER_BYTES = 16 * 1024
_REASON_BYTES = 1000
DROPPED_HEADERS_HEADER = "x-twophase-dropped-headers"


def dead_letter_headers(delivery: Delivery, reason: str) -> dict[str, str]:
    """The headers of ``delivery``'s dead-letter copy: the reason (cut to 1,000 bytes), the
    original routing key, and the original headers as far as they fit in 16 KiB, the smallest
    first (ids, trace context); how many were left out is said in a header of its own."""
    raw = reason.encode("utf-8", errors="replace")[:_REASON_BYTES]
    headers = {
        ERROR_HEADER: raw.decode("utf-8", errors="ignore"),
        ORIGINAL_KEY_HEADER: delivery.routing_key[:_SHORTSTR_MAX],
    }
    sizes = {k: len(k.encode()) + len(v.encode()) for k, v in delivery.headers.items()}
    kept: dict[str, str] = {}
    budget = _KEPT_HEADER_BYTES
    for key in sorted(sizes, key=sizes.__getitem__):
        if sizes[key] > budget:
            break
        budget -= sizes[key]
        kept[key] = delivery.headers[key]
    if len(kept) < len(sizes):
        dropped = len(sizes) - len(kept)
        headers[DROPPED_HEADERS_HEADER] = f"{dropped} headers too large to keep"
    return {**kept, **headers}


def _header_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _noop() -> None:
    pass


def _close_quietly(connection: Any) -> None:
    if connection is not None and connection.is_open:
        try:
            connection.close()
        except Exception:  # it is going away either way
            log.debug("error while closing the connection", exc_info=True)


def _enable_pipelined_confirms(
    channel: Any,
    on_confirm: Callable[[Any], None],
    on_return: Callable[[Any, Any, Any, bytes], None],
    on_close: Callable[[Any, BaseException], None],
) -> Any:
    """Put ``channel`` (a ``BlockingChannel``) in confirm mode; return the channel to publish on.

    ``BlockingChannel.confirm_delivery()`` would make each ``basic_publish`` wait for its confirm.
    Instead confirm mode is enabled on the async ``pika.channel.Channel`` behind it (pika 1.x
    private ``_impl``; the only private use in this module), the caller counts delivery numbers,
    and publishes go through that async channel, which only buffers the frames until the next
    ``process_data_events``.
    """
    impl = channel._impl  # pika 1.x private: the async channel behind the BlockingChannel
    impl.add_on_return_callback(on_return)
    impl.add_on_close_callback(on_close)
    select_ok: list[bool] = []

    def on_select_ok(_frame: Any) -> None:
        select_ok.append(True)
        channel.connection.call_later(0, _noop)  # wakes process_data_events

    impl.confirm_delivery(ack_nack_callback=on_confirm, callback=on_select_ok)
    deadline = time.monotonic() + _SETUP_TIMEOUT_SECONDS
    while not select_ok:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or channel.is_closed:
            raise pika.exceptions.AMQPChannelError("no Confirm.SelectOk from the broker")
        channel.connection.process_data_events(time_limit=remaining)
    return impl


_warned_unbounded: list[bool] = []


def _declare_dead_letter_queue(connection: Any) -> None:
    """Declare the dead-letter queue with its bounds, on a channel of its own: a queue declared
    earlier without them makes the broker refuse (and close that channel); it is then used as it
    is, and the operator is told how to bound it."""
    probe = connection.channel()
    try:
        probe.queue_declare(
            DEAD_LETTER_QUEUE, durable=True, arguments=dead_letter_queue_arguments()
        )
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:  # PRECONDITION_FAILED: declared before with other arguments
            raise
        if not _warned_unbounded:  # once per process, not once per connection
            _warned_unbounded.append(True)
            log.warning(
                "the dead-letter queue %s was declared by an older version without its bounds "
                "(x-max-length, x-max-length-bytes); delete it while empty so that it is "
                "declared again, or bound it with a policy (rabbitmqctl set_policy)",
                DEAD_LETTER_QUEUE,
            )
        return
    probe.close()


def _coalesce_writes(connection: Any) -> bool:
    """Send what pika has buffered with one system call, not one per frame: pika 1.x sends a
    message's method, header and body frames, and every publish and ack, each with its own
    ``send``, and each wakes the broker's reader. Uses pika's private plaintext transport (the
    second private use here, checked by a test); where it differs (TLS, another pika), pika's
    own writes stay. Whether the writes are now coalesced."""
    transport: Any = getattr(getattr(connection, "_impl", None), "_transport", None)
    if type(transport).__name__ != "_AsyncPlaintextTransport":
        return False
    buffers = getattr(transport, "_tx_buffers", None)
    produce = getattr(transport, "_produce", None)
    if not isinstance(buffers, collections.deque) or produce is None:
        return False

    def produce_joined() -> None:
        if len(buffers) > 1:
            joined = b"".join(buffers)
            buffers.clear()
            buffers.append(joined)
        produce()

    transport._produce = produce_joined
    return True


class AmqpChannel:
    """One connection + one confirm-mode channel, owned by one thread."""

    def __init__(
        self,
        url: str,
        *,
        prefetch: int = 256,
        connection_name: str = "twophase",
        connect_attempts: int = 1,
    ) -> None:
        self._url = url
        self._prefetch = prefetch
        self._connection_name = connection_name
        self._queues: dict[str, tuple[bool, bool]] = {}  # name -> (durable, exclusive)
        self._consumed: list[str] = []
        self._generation = 0
        self._connection: Any = None
        self._channel: Any = None
        self._publisher: Any = None  # the async channel behind self._channel (publishes only)
        self.coalesced_writes = False
        self._reset_state()
        self._connect(connect_attempts)

    @property
    def url(self) -> str:
        """The broker's URL, password included: redact it before showing it."""
        return self._url

    @property
    def generation(self) -> int:
        return self._generation

    def _reset_state(self) -> None:
        self._generation += 1
        self._lost: str | None = None
        self._buffer: list[Delivery] = []
        self._unacked: set[int] = set()
        self._next_seq = 0
        self._outstanding: dict[int, str] = {}  # delivery number -> routing key, ascending
        self._returned: set[int] = set()
        self._failed: dict[int, str] = {}
        self._woken = False

    def _connect(self, attempts: int) -> None:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(max(1, attempts)),
            wait=tenacity.wait_exponential(multiplier=0.1, min=0.1, max=2.0),
            retry=tenacity.retry_if_exception_type(_RETRYABLE),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._connect_once()
        except _RETRYABLE as exc:
            self._lost = f"broker unavailable: {_one_line(exc)}"
            raise BrokerUnavailable(
                f"cannot reach RabbitMQ at {redact_url(self._url)}: {_one_line(exc)}"
            ) from None

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.log(
            logging.WARNING if state.attempt_number == 1 else logging.DEBUG,
            "cannot reach RabbitMQ at %s (%s); retrying in %.1f s (attempt %d)",
            redact_url(self._url),
            _one_line(error) if error is not None else "?",
            wait,
            state.attempt_number,
        )

    def _connect_once(self) -> None:
        params = pika.URLParameters(self._url)
        params.heartbeat = HEARTBEAT_SECONDS
        params.blocked_connection_timeout = BLOCKED_CONNECTION_TIMEOUT_SECONDS
        params.client_properties = {"connection_name": self._connection_name}
        connection = pika.BlockingConnection(params)
        self.coalesced_writes = _coalesce_writes(connection)
        try:
            channel = connection.channel()
            gen = self._generation
            publisher = _enable_pipelined_confirms(
                channel,
                on_confirm=lambda frame: self._on_confirm(gen, frame),
                on_return=lambda _ch, _m, props, _b: self._on_return(gen, props),
                on_close=lambda _ch, reason: self._on_lost(gen, f"channel closed: {reason!r}"),
            )
            channel.add_on_cancel_callback(
                lambda frame: self._on_lost(gen, f"consumer cancelled by broker: {frame!r}")
            )
            channel.basic_qos(prefetch_count=self._prefetch)
            channel.exchange_declare(EXCHANGE, exchange_type="direct", durable=True)
            channel.exchange_declare(DEAD_LETTER_EXCHANGE, exchange_type="fanout", durable=True)
            _declare_dead_letter_queue(connection)
            channel.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, routing_key="")
            for name, (durable, exclusive) in self._queues.items():
                self._declare(channel, name, durable=durable, exclusive=exclusive)
            for queue in self._consumed:
                self._basic_consume(channel, queue)
        except BaseException:
            _close_quietly(connection)
            raise
        self._connection, self._channel, self._publisher = connection, channel, publisher

    def reconnect(self, attempts: int = 1_000_000) -> None:
        """Drop everything in flight and connect again (new generation).

        Buffered deliveries and outstanding confirms are discarded: the broker redelivers the
        former, and the caller must redo the publishes whose outcome is now unknown.
        """
        self._close_connection()
        self._reset_state()
        self._connect(attempts)

    def close(self) -> None:
        self._close_connection()
        self._lost = "closed by the application"

    def _close_connection(self) -> None:
        connection = self._connection
        self._connection = self._channel = self._publisher = None
        _close_quietly(connection)

    @staticmethod
    def _declare(channel: Any, name: str, *, durable: bool, exclusive: bool) -> None:
        if exclusive:
            channel.queue_declare(name, durable=False, exclusive=True, auto_delete=True)
        else:
            channel.queue_declare(name, durable=durable, arguments=durable_queue_arguments())
        channel.queue_bind(name, EXCHANGE, routing_key=name)

    def declare_queue(self, name: str, *, durable: bool = True, exclusive: bool = False) -> None:
        """Declare ``name`` and bind it to EXCHANGE under its own name (redone on reconnect)."""
        with self._remembering(lambda: self._queues.pop(name, None)):
            self._queues[name] = (durable, exclusive)
            with self._io():
                self._declare(self._channel, name, durable=durable, exclusive=exclusive)

    def queue_counts(self, name: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of an existing queue; ``None`` when it does not exist.

        A passive declare of a missing queue closes the channel, so it is asked on a channel of
        its own.
        """
        channel_log = logging.getLogger("pika.channel")
        level = channel_log.level
        channel_log.setLevel(logging.ERROR)  # a missing queue is an answer here, not a warning
        try:
            with self._io():  # a connection that died is ConnectionLost, as everywhere
                probe = self._connection.channel()
                try:
                    ok = probe.queue_declare(name, passive=True)
                except pika.exceptions.ChannelClosedByBroker as exc:
                    if exc.reply_code == 404:  # NOT_FOUND
                        return None
                    raise
                probe.close()
        finally:
            channel_log.setLevel(level)
        return int(ok.method.message_count), int(ok.method.consumer_count)

    def consume(self, queue: str) -> None:
        """Start consuming ``queue`` with manual ack (redone on reconnect)."""
        if queue in self._consumed:
            return
        with self._remembering(lambda: self._consumed.remove(queue)):
            self._consumed.append(queue)
            with self._io():
                self._basic_consume(self._channel, queue)

    @contextmanager
    def _remembering(self, forget: Callable[[], object]) -> Iterator[None]:
        """Keep what the block registered for reconnect unless the broker refused it."""
        try:
            yield
        except ConnectionLost as exc:
            if isinstance(exc.__cause__, pika.exceptions.ChannelClosedByBroker):
                forget()
            raise

    def _basic_consume(self, channel: Any, queue: str) -> None:
        on_message = functools.partial(self._on_message, self._generation, queue)
        channel.basic_consume(queue, on_message_callback=on_message, auto_ack=False)

    def _check_alive(self) -> None:
        conn, chan = self._connection, self._channel
        if self._lost is None and not (conn is not None and conn.is_open and chan.is_open):
            self._lost = "connection or channel is closed"
        if self._lost is not None:
            raise ConnectionLost(self._lost)

    @contextmanager
    def _io(self) -> Iterator[None]:
        """Check the connection, then turn pika errors inside the block into ConnectionLost."""
        self._check_alive()
        try:
            yield
        except _RETRYABLE as exc:
            if self._lost is None:
                self._lost = _one_line(exc)
            raise ConnectionLost(self._lost) from exc

    def _pump(self, time_limit: float) -> None:
        with self._io():
            self._connection.process_data_events(time_limit=max(0.0, time_limit))
        self._check_alive()

    def _on_lost(self, gen: int, reason: str) -> None:
        if gen == self._generation and self._lost is None:
            self._lost = reason

    def _on_message(
        self, gen: int, queue: str, _ch: Any, method: Any, props: Any, body: bytes
    ) -> None:
        if gen != self._generation:
            return
        raw = props.headers or {}
        headers = {str(k): _header_str(v) for k, v in raw.items() if k != SEQ_HEADER}
        tag = int(method.delivery_tag)
        self._unacked.add(tag)
        key, redelivered = str(method.routing_key), bool(method.redelivered)
        self._buffer.append(Delivery(bytes(body), headers, key, queue, tag, gen, redelivered))

    def _on_return(self, gen: int, props: Any) -> None:
        seq = (props.headers or {}).get(SEQ_HEADER)
        if gen == self._generation and isinstance(seq, int):
            self._returned.add(seq)  # its basic.ack follows; it is a failure then

    def _on_confirm(self, gen: int, frame: Any) -> None:
        if gen != self._generation:
            return
        method = frame.method
        tag = int(method.delivery_tag)
        nacked = isinstance(method, pika.spec.Basic.Nack)
        if method.multiple:  # self._outstanding is in ascending (insertion) order
            seqs = list(takewhile(lambda seq: seq <= tag, self._outstanding))
        else:
            seqs = [tag] if tag in self._outstanding else []
        for seq in seqs:
            routing_key = self._outstanding.pop(seq)
            if nacked or seq in self._returned:
                self._failed[seq] = routing_key
            self._returned.discard(seq)
        connection = self._connection
        if connection is not None:  # None once closed: a late confirm needs no wake-up
            connection.call_later(0, _noop)  # makes process_data_events return now

    def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
        persistent: bool = True,
        mandatory: bool = True,
    ) -> None:
        """Publish to EXCHANGE without waiting; see :meth:`wait_for_confirms`."""
        if len(routing_key.encode()) > _SHORTSTR_MAX:
            # pika would fail to frame it; that is this message's fault, not the connection's
            raise PublishRefused(f"routing key of {len(routing_key.encode())} bytes (max 255)")
        mode = pika.DeliveryMode.Persistent if persistent else None
        props = pika.BasicProperties(headers=dict(headers or {}), delivery_mode=mode)
        self._publish(EXCHANGE, routing_key, body, props, mandatory)

    def _publish(self, exchange: str, key: str, body: bytes, props: Any, mandatory: bool) -> int:
        seq = self._next_seq + 1
        props.headers[SEQ_HEADER] = seq
        with self._io():  # only buffers the frames: see _enable_pipelined_confirms
            self._publisher.basic_publish(exchange, key, body, props, mandatory)
        self._next_seq = seq
        self._outstanding[seq] = key
        return seq

    def wait_for_confirms(self, timeout: float = 30.0) -> None:
        """Block until every outstanding publish is confirmed; PublishError if any failed.

        ConnectionLost on disconnect or if not all are confirmed within ``timeout`` seconds.
        """
        self._wait_until(lambda: not self._outstanding, timeout)
        failed, self._failed = self._failed, {}
        if failed:
            raise PublishError(list(failed.values()))

    def take_failures(self) -> list[str]:
        """Routing keys of publishes the broker has refused (returned or nacked) so far, for a
        publisher that does not wait for confirms; forgets them."""
        failed, self._failed = self._failed, {}
        return list(failed.values())

    def _wait_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._pump(0)
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._lost = f"no publisher confirm within {timeout}s"
                raise ConnectionLost(self._lost)
            self._pump(remaining)

    def poll(self, timeout: float, max_messages: int = 10_000) -> list[Delivery]:
        """Buffered deliveries, waiting up to ``timeout`` seconds for the first one.

        Returns early (possibly empty) after a :meth:`call_threadsafe` callback has run.
        """
        deadline = time.monotonic() + timeout
        self._woken = False
        self._drain(max_messages)
        while not self._buffer and not self._woken:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._pump(remaining)
            self._drain(max_messages)
        out = self._buffer[:max_messages]
        del self._buffer[:max_messages]
        return out

    def _drain(self, max_messages: int) -> None:
        """Process what is readable now, until nothing new arrives or the buffer is full."""
        while True:
            before = len(self._buffer)
            self._pump(0)
            if len(self._buffer) == before or len(self._buffer) >= max_messages:
                return

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge deliveries of the current generation; older ones are skipped.

        The acks are only buffered (on the async channel, as publishes are) and leave with the
        next poll or wait, which follows at once in a driver's loop: the blocking channel would
        run pika's I/O loop once more per batch just to send them. An ack lost with the
        connection means a redelivery, which every handler tolerates."""
        current = [d.delivery_tag for d in deliveries if d.generation == self._generation]
        tags = self._unacked.intersection(current)
        if not tags:
            return
        highest = max(tags)
        with self._io():
            if sum(1 for t in self._unacked if t <= highest) == len(tags):
                self._publisher.basic_ack(delivery_tag=highest, multiple=True)
            else:
                for tag in sorted(tags):
                    self._publisher.basic_ack(delivery_tag=tag, multiple=False)
        self._unacked -= tags

    def dead_letter(self, delivery: Delivery, reason: str, timeout: float = 30.0) -> None:
        """Copy ``delivery`` to the dead-letter exchange, wait for its confirm, then ack it."""
        self.dead_letter_many([(delivery, reason)], timeout)

    def dead_letter_many(
        self, rejected: Sequence[tuple[Delivery, str]], timeout: float = 30.0
    ) -> None:
        """Copy each delivery to the dead-letter exchange with its reason in ERROR_HEADER, wait
        once for the confirms, then ack them.

        A delivery of an older generation is skipped: it is redelivered and dead-lettered again.
        """
        seqs: list[tuple[int, Delivery]] = []
        for delivery, reason in rejected:
            if delivery.generation != self._generation:
                continue
            key = delivery.routing_key
            headers = dead_letter_headers(delivery, reason)
            props = pika.BasicProperties(
                headers=headers, delivery_mode=pika.DeliveryMode.Persistent
            )
            seqs.append(
                (self._publish(DEAD_LETTER_EXCHANGE, key, delivery.body, props, True), delivery)
            )
        if not seqs:
            return
        self._wait_until(lambda: all(seq not in self._outstanding for seq, _ in seqs), timeout)
        failed = [self._failed.pop(seq) for seq, _ in seqs if seq in self._failed]
        if failed:  # no dead-letter queue bound (deleted by hand): the message is bad either way
            log.error("the dead-letter exchange refused %d rejected messages; dropped", len(failed))
        self.ack([delivery for _, delivery in seqs])

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the owning thread in its next poll/wait (callable from any thread)."""
        connection = self._connection
        if connection is None:
            raise ConnectionLost("not connected")

        def wrapped() -> None:
            self._woken = True
            fn()

        try:
            connection.add_callback_threadsafe(wrapped)
        except pika.exceptions.AMQPError as exc:
            raise ConnectionLost(_one_line(exc)) from exc
