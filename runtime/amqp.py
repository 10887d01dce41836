"""RabbitMQ access for one thread: one connection, one channel with pipelined confirms.

Publishes do not wait; ``wait_for_confirms`` waits once for a whole batch. After a disconnect every
call raises ``ConnectionLost`` until ``reconnect()``, which starts a new *generation*: delivery tags
of an older generation are never acked. Other threads may only use ``call_threadsafe``. The
connection is pika's asynchronous one, driven in the owning thread (see ``runtime.amqp_loop``).
"""

from __future__ import annotations

import functools
import logging
import re
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

from runtime import config, tls
from runtime.amqp_loop import AmqpLink, expect_close
from runtime.amqp_loop import one_line as _one_line
from runtime.errors import (
    BrokerUnavailable,
    ConfigurationError,
    ConnectionLost,
    InstanceRunning,
    PublishError,
    PublishRefused,
)
from runtime.redaction import redact_url
from schemas.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    ERROR_HEADER,
    EXCHANGE,
    EXCHANGE_TYPE,
    QUEUE_TYPE_ARGUMENT,
    QUEUE_TYPES,
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
_RETRYABLE = (pika.exceptions.AMQPError, OSError)
_PRECONDITION_FAILED = 406  # a queue declared again with other arguments than it has


_ACCESS_REFUSED = 403
_RESOURCE_LOCKED = 405  # an exclusive queue of another connection
#: how long a reconnect waits for a lock held by another connection: the broker drops a dead
#: connection (this process's previous one, say) within two heartbeats
LOCK_WAIT_S = 2 * HEARTBEAT_SECONDS + 10


def _take_lock(link: AmqpLink, name: str) -> bool:
    """Declare ``name`` as an exclusive, auto-deleted queue of this connection, on a channel of
    its own (the queue belongs to the connection); False if another connection holds it
    (RESOURCE_LOCKED, which closes that channel only)."""
    probe = link.open_channel()
    expect_close(probe, _RESOURCE_LOCKED)  # the answer, said in our own words
    try:
        link.call(probe, probe.queue_declare, name, exclusive=True, auto_delete=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code not in (_RESOURCE_LOCKED, _ACCESS_REFUSED):
            raise
        refused = exc.reply_code == _ACCESS_REFUSED
    else:
        link.close_channel(probe)
        return True
    if refused:  # raised out of the handler: a setting to fix, not an outage to wait out
        raise ConfigurationError(
            f"RabbitMQ refused this account the declare of {name}, this service's lock: grant "
            "it configure permission on that name (compose/rabbitmq/definitions.json)"
        )
    return False


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


_warned_unbounded: list[bool] = []


def _declare_durable(link: AmqpLink, name: str, arguments: dict[str, object]) -> str | None:
    """Declare the durable queue ``name`` on a channel of its own: None once declared, or the
    broker's reply when it refuses because the queue exists with other arguments (406, which
    closes that channel and no other)."""
    probe = link.open_channel()
    expect_close(probe, _PRECONDITION_FAILED)  # the answer, said in our own words
    try:
        link.call(probe, probe.queue_declare, name, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != _PRECONDITION_FAILED:
            raise
        return " ".join(str(exc.reply_text).split())
    link.close_channel(probe)
    return None


def _other_type(refusal: str) -> str | None:
    """The type the queue has, when the broker refused a declare for its ``x-queue-type``
    (``... inequivalent arg 'x-queue-type' ... but current is 'classic'``; ``current is none``:
    declared without one, a classic queue); None when it refused another argument."""
    if f"'{QUEUE_TYPE_ARGUMENT}'" not in refusal:
        return None
    found = re.search(r"current is (?:the value )?'([^']*)'", refusal)
    return found[1] if found else "classic"


def _wrong_type(name: str, queue_type: str, current: str) -> ConfigurationError:
    variable = config.QUEUE_TYPE_VARIABLE
    return ConfigurationError(
        f"queue {name} is a {current} queue, but {variable}={queue_type}, and a queue's type "
        f"cannot change: stop every twophase process and delete the twophase queues once they "
        f"are empty (rabbitmqctl delete_queue), or use a new virtual host, or set "
        f"{variable}={current}"
    )


def _declare_dead_letter_queue(link: AmqpLink, queue_type: str) -> None:
    """Declare the dead-letter queue with its bounds, on a channel of its own: a queue declared
    earlier without them makes the broker refuse (and close that channel); it is then used as it
    is, and the operator is told how to bound it. Of another type than ``queue_type``:
    ConfigurationError (one line, what to do)."""
    refusal = _declare_durable(link, DEAD_LETTER_QUEUE, dead_letter_queue_arguments(queue_type))
    if refusal is None:
        return
    current = _other_type(refusal)
    if current is None:
        # Not its type, or not its type first: the broker names the first argument that
        # differs. Declared by an older version without bounds, it has only the type, if any.
        unbounded: dict[str, object] = {}
        if queue_type != "classic":
            unbounded[QUEUE_TYPE_ARGUMENT] = queue_type
        again = _declare_durable(link, DEAD_LETTER_QUEUE, unbounded)
        current = None if again is None else _other_type(again)
    if current is not None:
        raise _wrong_type(DEAD_LETTER_QUEUE, queue_type, current)
    if not _warned_unbounded:  # once per process, not once per connection
        _warned_unbounded.append(True)
        log.warning(
            "the dead-letter queue %s was declared by an older version without its bounds "
            "(x-max-length, x-max-length-bytes); delete it while empty so that it is "
            "declared again, or bound it with a policy (rabbitmqctl set_policy)",
            DEAD_LETTER_QUEUE,
        )


class AmqpChannel:
    """One connection + one confirm-mode channel, owned by one thread."""

    def __init__(
        self,
        url: str,
        *,
        prefetch: int = 256,
        connection_name: str = "twophase",
        connect_attempts: int = 1,
        queue_type: str | None = None,
    ) -> None:
        """``queue_type``: of the durable queues it declares, ``classic`` or ``quorum``; None:
        ``TWOPHASE_QUEUE_TYPE`` (runtime.config.queue_type, ConfigurationError if not one)."""
        if queue_type is None:
            queue_type = config.queue_type()
        elif queue_type not in QUEUE_TYPES:
            raise ConfigurationError(f"queue type {queue_type!r} is not one of {QUEUE_TYPES}")
        self._queue_type = queue_type
        self._url = url
        self._prefetch = prefetch
        self._connection_name = connection_name
        self._queues: dict[str, tuple[bool, bool]] = {}  # name -> (durable, exclusive)
        self._consumed: list[str] = []
        #: the broker's locks this channel holds (:meth:`hold`), taken again on reconnect
        self._locks: list[str] = []
        self._lock_contested = False
        self._generation = 0
        self._link: AmqpLink | None = None
        self._channel: Any = None  # a pika.channel.Channel of self._link
        self._reset_state()
        self._connect(connect_attempts)

    @property
    def url(self) -> str:
        """The broker's URL, password included: redact it before showing it."""
        return self._url

    @property
    def queue_type(self) -> str:
        return self._queue_type

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
        self._until: Callable[[], bool] | None = None

    def _connect(self, attempts: int) -> None:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(max(1, attempts)),
            wait=tenacity.wait_exponential(multiplier=0.1, min=0.1, max=2.0),
            # an untrusted certificate stays untrusted however often it is tried
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, _RETRYABLE) and tls.certificate_refused(e) is None
            ),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._connect_once()
            return
        except _RETRYABLE as exc:
            refused = tls.certificate_refused(exc)
            if refused is None:
                self._lost = f"broker unavailable: {_one_line(exc)}"
                raise BrokerUnavailable(
                    f"cannot reach RabbitMQ at {redact_url(self._url)}: {_one_line(exc)}"
                ) from None
        # raised outside the except clause: with the connection error as its context it would
        # count as an outage (runtime.outages follows the context) and be waited for forever
        self._lost = f"certificate refused: {refused}"
        raise ConfigurationError(
            f"RabbitMQ at {redact_url(self._url)} presented a certificate that is not "
            f"trusted: {refused} (cacertfile / {tls.CA_VARIABLE})"
        )

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
        params = tls.amqp_parameters(self._url)
        params.heartbeat = HEARTBEAT_SECONDS
        params.blocked_connection_timeout = BLOCKED_CONNECTION_TIMEOUT_SECONDS
        params.client_properties = {"connection_name": self._connection_name}
        gen = self._generation
        link = AmqpLink(params, on_lost=lambda reason: self._on_lost(gen, reason))
        try:
            channel = link.open_channel()
            channel.add_on_return_callback(lambda _ch, _m, props, _b: self._on_return(gen, props))
            channel.add_on_close_callback(
                lambda _ch, reason: self._on_lost(gen, f"channel closed: {reason!r}")
            )

            def on_cancel(frame: Any) -> None:
                self._on_lost(gen, f"consumer cancelled by broker: {frame!r}")
                link.wake()

            channel.add_on_cancel_callback(on_cancel)
            # each publish is counted here and confirmed in batches: wait_for_confirms
            on_confirm = functools.partial(self._on_confirm, gen)
            link.call(channel, channel.confirm_delivery, ack_nack_callback=on_confirm)
            link.call(channel, channel.basic_qos, prefetch_count=self._prefetch)
            for exchange, kind in ((EXCHANGE, EXCHANGE_TYPE), (DEAD_LETTER_EXCHANGE, "fanout")):
                link.call(
                    channel, channel.exchange_declare, exchange, exchange_type=kind, durable=True
                )
            _declare_dead_letter_queue(link, self._queue_type)
            link.call(
                channel, channel.queue_bind, DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, routing_key=""
            )
            for lock in self._locks:  # first: nothing is consumed without the lock
                self._take_lock_again(link, lock)
            for name, (durable, exclusive) in self._queues.items():
                self._declare(link, channel, name, durable=durable, exclusive=exclusive)
            for queue in self._consumed:
                self._basic_consume(link, channel, queue)
        except BaseException:
            link.close()
            raise
        self._link, self._channel = link, channel

    def _take_lock_again(self, link: AmqpLink, lock: str) -> None:
        """On reconnect: the lock, once another connection lets it go. That is this process's
        previous connection until the broker notices it is dead, or another instance that took
        over meanwhile; past LOCK_WAIT_S it is the latter, and InstanceRunning ends this one."""
        waited_since = time.monotonic()
        while not _take_lock(link, lock):
            if not self._lock_contested:
                log.warning(
                    "%s is held by another connection (this process's previous one, not yet "
                    "dropped by the broker, or another instance); waiting up to %d s",
                    lock,
                    LOCK_WAIT_S,
                )
            self._lock_contested = True
            if time.monotonic() - waited_since > LOCK_WAIT_S:
                raise InstanceRunning(
                    f"{lock} is still held by another connection after {LOCK_WAIT_S} s: another "
                    "instance took over while this one was cut off from RabbitMQ"
                )
            link.run(1.0)  # not a sleep: the loop keeps sending this connection's heartbeats

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
        link = self._link
        self._link = self._channel = None
        if link is not None:
            link.close()

    def _declare(
        self, link: AmqpLink, channel: Any, name: str, *, durable: bool, exclusive: bool
    ) -> None:
        """Declare ``name`` and bind it. A durable queue is declared with the arguments of
        ``self._queue_type`` on a channel of its own; one the broker refuses (it exists with
        another type or other arguments) is a ConfigurationError, which waiting never mends.
        An exclusive one (a client's reply queue) is always classic: quorum queues cannot be
        exclusive nor auto-delete."""
        if exclusive:
            declared = {"durable": False, "exclusive": True, "auto_delete": True}
            link.call(channel, channel.queue_declare, name, **declared)
        elif durable:
            refusal = _declare_durable(link, name, durable_queue_arguments(self._queue_type))
            if refusal is not None:
                current = _other_type(refusal)
                if current is not None:
                    raise _wrong_type(name, self._queue_type, current)
                raise ConfigurationError(
                    f"queue {name} exists with other arguments than this version declares "
                    f"({refusal}): delete it once it is empty, or use a new virtual host"
                )
        else:  # transient and shared: no protocol queue is one; classic (quorum is durable)
            arguments = durable_queue_arguments("classic")
            link.call(channel, channel.queue_declare, name, durable=False, arguments=arguments)
        link.call(channel, channel.queue_bind, name, EXCHANGE, routing_key=name)

    def declare_queue(self, name: str, *, durable: bool = True, exclusive: bool = False) -> None:
        """Declare ``name`` and bind it to EXCHANGE under its own name (redone on reconnect).

        ConfigurationError if the broker refuses the declare of a durable queue for its type or
        arguments (see :meth:`_declare`); then nothing is remembered for reconnect."""
        with self._remembering(lambda: self._queues.pop(name, None)):
            self._queues[name] = (durable, exclusive)
            try:
                with self._io() as link:
                    self._declare(link, self._channel, name, durable=durable, exclusive=exclusive)
            except ConfigurationError:
                self._queues.pop(name, None)
                raise

    def queue_counts(self, name: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of an existing queue; ``None`` when it does not exist.

        A passive declare of a missing queue closes the channel, so it is asked on a channel of
        its own.
        """
        with self._io() as link:  # a connection that died is ConnectionLost, as everywhere
            probe = link.open_channel()
            expect_close(probe, 404)  # a missing queue is an answer here, not a warning
            try:
                ok = link.call(probe, probe.queue_declare, name, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:  # NOT_FOUND
                    return None
                raise
            link.close_channel(probe)
        return int(ok.method.message_count), int(ok.method.consumer_count)

    def consume(self, queue: str) -> None:
        """Start consuming ``queue`` with manual ack (redone on reconnect)."""
        if queue in self._consumed:
            return
        with self._remembering(lambda: self._consumed.remove(queue)):
            self._consumed.append(queue)
            with self._io() as link:
                self._basic_consume(link, self._channel, queue)

    def hold(self, lock: str) -> None:
        """Hold the broker's lock ``lock`` for as long as this channel lives, reconnects included:
        an exclusive queue of this connection, which the broker refuses to any other connection
        and deletes when this one goes (runtime/instances.py). InstanceRunning if another
        connection holds it now."""
        if lock in self._locks:
            return
        with self._io() as link:
            taken = _take_lock(link, lock)
        if not taken:  # raised here, out of any handler: a refusal is no outage to wait out
            raise InstanceRunning(f"{lock} is held by another connection")
        self._locks.append(lock)

    def take_lock_contested(self) -> bool:
        """Whether a reconnect found a lock held by another connection and waited for it (since
        the last call): another instance may have served meanwhile, so what this process holds
        in memory may be stale and must be rebuilt from the log."""
        contested, self._lock_contested = self._lock_contested, False
        return contested

    @contextmanager
    def _remembering(self, forget: Callable[[], object]) -> Iterator[None]:
        """Keep what the block registered for reconnect unless the broker refused it."""
        try:
            yield
        except ConnectionLost as exc:
            if isinstance(exc.__cause__, pika.exceptions.ChannelClosedByBroker):
                forget()
            raise

    def _basic_consume(self, link: AmqpLink, channel: Any, queue: str) -> None:
        on_message = functools.partial(self._on_message, self._generation, queue)
        link.call(channel, channel.basic_consume, queue, on_message, auto_ack=False)

    def _check_alive(self) -> AmqpLink:
        link, chan = self._link, self._channel
        if self._lost is None and not (link is not None and link.is_open and chan.is_open):
            self._lost = "connection or channel is closed"
        if self._lost is not None or link is None:
            raise ConnectionLost(self._lost or "not connected")
        return link

    @contextmanager
    def _io(self) -> Iterator[AmqpLink]:
        """Check the connection, then turn pika errors inside the block into ConnectionLost."""
        link = self._check_alive()
        try:
            yield link
        except _RETRYABLE as exc:
            if self._lost is None:
                self._lost = _one_line(exc)
            raise ConnectionLost(self._lost) from exc

    def _pump(self, time_limit: float, until: Callable[[], bool] | None = None) -> None:
        """Run the I/O loop up to ``time_limit`` seconds, returning early once ``until()``."""
        self._until = until
        try:
            with self._io() as link:
                link.run(time_limit)
        finally:
            self._until = None
        self._check_alive()

    def _wake_if_done(self) -> None:
        """End the running :meth:`_pump` if what it waits for is there: every restart of the
        loop costs system calls."""
        until, link = self._until, self._link
        if link is not None and (until is None or until()):
            link.wake()

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
        self._wake_if_done()

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
        self._wake_if_done()

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
        with self._io():  # only buffers the frames, sent when the loop next runs
            self._channel.basic_publish(exchange, key, body, props, mandatory)
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
        if done():
            self._pump(0)  # still sends what is buffered (acks)
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._lost = f"no publisher confirm within {timeout}s"
                raise ConnectionLost(self._lost)
            self._pump(remaining, done)

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
            self._pump(remaining, lambda: bool(self._buffer) or self._woken)
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

        The acks are only buffered, as publishes are, and leave with the next poll or wait, which
        follows at once in a driver's loop. An ack lost with the connection means a redelivery,
        which every handler tolerates."""
        current = [d.delivery_tag for d in deliveries if d.generation == self._generation]
        tags = self._unacked.intersection(current)
        if not tags:
            return
        highest = max(tags)
        with self._io():
            if sum(1 for t in self._unacked if t <= highest) == len(tags):
                self._channel.basic_ack(delivery_tag=highest, multiple=True)
            else:
                for tag in sorted(tags):
                    self._channel.basic_ack(delivery_tag=tag, multiple=False)
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
        link = self._link
        if link is None:
            raise ConnectionLost("not connected")

        def wrapped() -> None:
            self._woken = True
            self._wake_if_done()
            fn()

        link.add_callback_threadsafe(wrapped)
