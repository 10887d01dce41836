"""The I/O shell both sides share: consume a batch, run the core, persist, publish, ack.

One ``BatchDriver`` owns one AMQP channel and runs in one thread. Each turn of its loop:

1. takes what the broker delivered (up to the prefetch) and the timers that are due;
2. runs every event through the core, collecting effects; side-specific effects (running a
   handler, reading the log) are performed by the *side* it was given (``runtime.seams``) and
   may feed events back;
3. makes the batch's records durable in **one** log transaction (group commit);
4. publishes the batch's messages (persistent, mandatory) and waits for the broker's confirms;
5. only then acks the consumed messages.

A crash between any two steps leaves either a redelivery or a durable record, never a lost or
doubled effect: every message is handled idempotently by the cores. If the connection drops, the
batch's messages are published again after reconnecting (duplicates are harmless by design) and
the unacked deliveries come back redelivered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, cast

import msgspec

from runtime import logs, outages, selfstats
from runtime.amqp import AmqpChannel, Delivery
from runtime.auth import Auth, Refusal, Verified
from runtime.crashpoints import crashpoint
from runtime.errors import ConnectionLost, InstanceRunning, PublishError, PublishRefused
from runtime.journal import Journal
from runtime.seams import CoreEffect, DriverEvent, Observer, Side, plain_headers
from runtime.suspects import POISON_ATTEMPTS, Suspects
from runtime.timers import Timers
from schemas.codec import DecodeError, decode_message, encode
from schemas.effects import (
    CancelTimer,
    Forget,
    Incoming,
    Persist,
    ProtocolViolation,
    Send,
    StartTimer,
    TimerFired,
)
from schemas.messages import Envelope, Enveloped, Message
from schemas.topology import TRACEPARENT_HEADER
from schemas.validation import (
    DEFAULT_LIMITS,
    ENVELOPE_MAX,
    InvalidMessage,
    Limits,
    check,
    size_problem,
    traceparent_or_empty,
)

log = logging.getLogger("twophase.driver")


#: the side's events (its core's ``Event``), its own effects, its log records (runtime.seams)
E = TypeVar("E")
F = TypeVar("F")
R = TypeVar("R", bound=msgspec.Struct)
T = TypeVar("T")


class _Closes(Protocol):
    def close(self) -> None: ...


J = TypeVar("J", bound=_Closes)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class DriverStats:
    batches: int = 0
    messages_in: int = 0
    #: AMQP messages published (an envelope counts once)
    messages_out: int = 0
    protocol_messages_out: int = 0
    dead_lettered: int = 0
    protocol_violations: int = 0
    reconnects: int = 0
    #: in-process restarts: the core rebuilt from the log after an outage or a failed batch
    restarts: int = 0
    #: nanoseconds of turns spent in each step (what ``twophase bench`` reports per process)
    handle_ns: int = 0
    flush_ns: int = 0
    publish_ns: int = 0
    ack_ns: int = 0


@dataclass
class _Chore:
    interval_ms: int
    run: Callable[[int], None]
    next_ms: int = 0


class BatchDriver(Generic[E, F, R]):
    """The batch loop, given a side and (optionally) an observer: see ``runtime.seams``."""

    def __init__(
        self,
        channel: AmqpChannel,
        journal: Journal[R],
        side: Side[E, F, R],
        *,
        name: str,
        role: str,
        queue: str,
        watch: outages.DependencyWatch,
        observer: Observer[E, F, R] | None = None,
        max_batch: int = 256,
        idle_poll_s: float = 0.2,
        limits: Limits = DEFAULT_LIMITS,
        accepts: tuple[type[Message], ...] | None = None,
        auth: Auth | None = None,
    ) -> None:
        """Assemble the loop; nothing is connected, read or started here (the composition
        root of each process does that: configure, connect, recover, serve)."""
        self.channel = channel
        #: only read for its counters: the side writes the records (:meth:`Side.write_records`)
        self.journal = journal
        self.side = side
        self.observer = observer
        #: how log lines name this service
        self.name = name
        #: crash point names are "<role>.after_persist" etc.
        self.role = role
        self.queue = queue
        self.max_batch = max_batch
        self.idle_poll_s = idle_poll_s
        self.limits = limits
        #: the protocol message types this driver's queue takes (None: any)
        self.accepts = accepts
        #: signs what this driver publishes and verifies what it consumes (None: off, §11)
        self.auth = auth
        self.timers = Timers()
        self.stats = DriverStats()
        #: time.monotonic() of the last turn that did not fail (the heartbeats report a stall)
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        self._records: list[R] = []
        self._sends: list[Send] = []
        self._injected: deque[DriverEvent | E] = deque()
        self._chores: list[_Chore] = []
        #: digest of a delivery whose handling raised -> (times, the last error)
        self._suspects = Suspects()
        #: suspects held back, to be handled one per batch (so that the culprit is found)
        self._held: deque[Delivery] = deque()
        self._batch: list[Delivery] = []
        #: the delivery whose message the core is handling (None: a timer, a derived event)
        self._handling: Delivery | None = None
        self.watch = watch
        #: RabbitMQ is probed by reconnecting, not by the watch; it is only reported through it
        self._broker = outages.Dependency("rabbitmq", str(getattr(channel, "url", "")), _no_probe)
        self.watch.report_up(self._broker)
        self._rejections: dict[str, int] = {}
        self._noticed: dict[str, int] = {}
        self.every(10.0, self._report_rejections)
        stats_file = os.environ.get(selfstats.ENV)
        if stats_file:
            self.every(0.5, lambda _now: selfstats.write(stats_file, self.counters()))

    @property
    def observing(self) -> bool:
        """Whether an observer is called (tracing or metrics on)."""
        return self.observer is not None

    # ---- what a side may ask of its driver ----------------------------------------------

    def inject(self, events: Iterable[E]) -> None:
        """Handle ``events`` in the next turn, before what the broker delivered."""
        self._injected.extend(events)

    def recover(self) -> None:
        """Rebuild the core from the log: the side reads it, its events are handled next turn."""
        self.inject(self.side.recover())

    def _unroutable(self, send: Send) -> None:
        events = list(self.side.on_unroutable(send))
        if events:
            self.inject(events)
            return
        self._noted("unroutable replies")
        log.debug(
            "unroutable message to %s: %s",
            send.queue,
            type(send.message).__name__,
            extra=logs.tx(getattr(send.message, "tx_id", ""), send.traceparent),
        )

    def _headers_for(self, send: Send) -> dict[str, str] | None:
        if self.observer is not None:
            return self.observer.headers_for(send)
        return plain_headers(send)

    def counters(self) -> dict[str, int]:
        """What ``twophase bench`` reads: traffic, and forced writes as log transactions."""
        return {
            "batches": self.stats.batches,
            "messages_in": self.stats.messages_in,
            "messages_out": self.stats.messages_out,
            "protocol_messages_out": self.stats.protocol_messages_out,
            "log_flushes": self.journal.flushes,
            "log_records": self.journal.log.rows_written,
            "dead_lettered": self.stats.dead_lettered,
            "handle_ns": self.stats.handle_ns,
            "flush_ns": self.stats.flush_ns,
            "publish_ns": self.stats.publish_ns,
            "ack_ns": self.stats.ack_ns,
        }

    def every(self, interval_s: float, chore: Callable[[int], None]) -> None:
        """Run ``chore(now_ms)`` on this driver's thread about every ``interval_s`` seconds."""
        self._chores.append(_Chore(int(interval_s * 1000), chore))

    def periodic(self, now: int) -> None:
        """Called once per loop turn: runs the chores that are due (heartbeats, log GC...)."""
        for chore in self._chores:
            if now >= chore.next_ms:
                chore.next_ms = now + chore.interval_ms
                chore.run(now)

    # ---- the loop -------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        # the loop notices the flag within idle_poll_s anyway
        with contextlib.suppress(Exception):
            self.channel.call_threadsafe(lambda: None)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        self.channel.consume(self.queue)
        while not self._stop.is_set():
            self.step()

    def step(self) -> None:
        """One turn of the loop; a failure is dealt with here, as the service deals with it
        (tests step a driver with this, or with :meth:`turn` to see the failure itself)."""
        try:
            try:
                self.turn()
            except ConnectionLost as exc:
                self._recover_connection(exc)
        except InstanceRunning:
            raise  # another instance took over while this one was cut off: it must stop
        except Exception as exc:
            self._after_failure(exc)

    def _recover_connection(self, exc: ConnectionLost) -> None:
        """Reconnect and re-publish the last batch's messages, as often as the broker bounces."""
        while True:
            self.watch.lost(self._broker, str(exc))
            self.stats.reconnects += 1
            self.channel.reconnect()
            if self.channel.take_lock_contested():
                # another instance may have served meanwhile: what memory holds may be stale
                log.warning("%s: its lock was held by another connection; rebuilding", self.name)
                self._restart()
                self.watch.regained(self._broker)
                return
            try:
                self.republish()
            except ConnectionLost as again:
                exc = again
            else:
                self.watch.regained(self._broker)
                return

    def _after_failure(self, exc: Exception) -> None:
        """A batch failed: nothing of it left the process, so the process is treated as if it
        had crashed at that point, without exiting. An outage is waited out; any other
        exception makes the batch's messages suspects (the one being handled, if known). Then
        the in-memory state is rebuilt from the log, as after a restart, and the broker
        redelivers what was not acked; a suspect that keeps failing is dead-lettered."""
        cause = outages.outage_cause(exc)
        if cause is None:
            self._suspect(exc)
        else:
            log.warning("%s: a batch failed on an outage (%s)", self.name, cause)
        self._restart()

    def _suspect(self, exc: Exception) -> None:
        error = outages.one_line(exc)[:300]
        culprits = [self._handling] if self._handling is not None else self._batch
        log.error(
            "%s: handling %d message(s) raised %s; they are retried at most %d times",
            self.name,
            len(culprits),
            error,
            POISON_ATTEMPTS,
            exc_info=exc,
        )
        self._suspects.blame(culprits, error)

    def _restart(self) -> None:
        """Rebuild the in-memory state from the log once every dependency answers."""
        self.stats.restarts += 1
        self._held.clear()
        self._batch, self._handling = [], None
        try:
            for attempt in outages.retrying(until=self._stop, what=f"{self.name}: restarting"):
                with attempt:
                    self.watch.wait_until_up(self._stop)
                    if self._stop.is_set():
                        return
                    self._records, self._sends = [], []
                    self._injected.clear()
                    self.timers = Timers()
                    self.side.reset()
                    self.channel.reconnect()
                    self.recover()
        except Exception:
            if self._stop.is_set():
                return
            raise
        log.info("%s: state rebuilt from the log; serving again", self.name)

    def turn(self) -> None:
        """One batch (see the module's docstring); what the side staged outside the driver is
        dropped if it fails."""
        try:
            self._turn()
        except BaseException:
            self.side.abandon()  # nothing of the failed batch becomes durable
            raise
        self.last_progress = time.monotonic()

    def _turn(self) -> None:
        now = now_ms()
        deadline = self.timers.next_deadline()
        wait = (
            self.idle_poll_s
            if deadline is None
            else max(0.0, min(self.idle_poll_s, (deadline - now) / 1000))
        )
        if self._injected:
            wait = 0.0
        deliveries = self._take(wait)
        self._batch = deliveries
        now = now_ms()
        self.periodic(now)
        events: deque[tuple[DriverEvent | E, Delivery | None]] = deque(
            (e, None) for e in self._injected
        )
        self._injected.clear()
        good: list[Delivery] = []
        rejected: list[tuple[Delivery, str, str]] = []
        for delivery in deliveries:
            admitted = self._admit(delivery, now)
            if isinstance(admitted, tuple):
                rejected.append((delivery, *admitted))
            else:
                events.extend((event, delivery) for event in admitted)
                good.append(delivery)
        if rejected:
            self._dead_letter(rejected)
        events.extend((TimerFired(key), None) for key in self.timers.due(now))
        if not events:
            return
        stats = self.stats
        stats.batches += 1
        stats.messages_in += len(deliveries)
        started = time.perf_counter_ns()
        self._run_events(events, now)
        handled = time.perf_counter_ns()
        stats.handle_ns += handled - started
        # A crash point fires only where its step did something, so that an armed point hits
        # a batch that really persisted, published or acked (not an idle turn at start-up).
        if self._flush_records():
            crashpoint(f"{self.role}.after_persist")
        flushed = time.perf_counter_ns()
        stats.flush_ns += flushed - handled
        if self._sends:
            self._publish()
            crashpoint(f"{self.role}.after_publish")
        published = time.perf_counter_ns()
        stats.publish_ns += published - flushed
        self.channel.ack(good)
        if good:
            crashpoint(f"{self.role}.after_ack")
        stats.ack_ns += time.perf_counter_ns() - published
        self._suspects.cleared(good)
        if self.observer is not None:
            self.observer.on_batch_end(len(deliveries))

    def _take(self, wait: float) -> list[Delivery]:
        """The next batch: suspects of an earlier failure come one per batch, after the rest."""
        if self._held:
            return [self._held.popleft()]
        deliveries = self.channel.poll(wait, self.max_batch)
        if self._suspects and len(deliveries) > 1:
            suspects = [d for d in deliveries if d in self._suspects]
            if suspects:
                self._held.extend(suspects)
                deliveries = [d for d in deliveries if d not in self._suspects]
                if not deliveries:
                    deliveries = [self._held.popleft()]
        return deliveries

    def _admit(self, delivery: Delivery, now: int) -> list[Incoming] | tuple[str, str]:
        """The delivery's events, or (category, reason) to dead-letter it with."""
        problem = size_problem(len(delivery.body), self.limits)
        if problem is not None:
            return "oversized", problem
        poison = self._suspects.poison(delivery)
        if poison is not None:
            return "poison", poison
        auth, verified = self.auth, None
        if auth is not None:
            # before decoding: a forger must not reach the decoder (or the core) at all
            verified = auth.verify(delivery.body, delivery.headers, self.queue)
            if isinstance(verified, Refusal):
                return verified.reason, verified.detail
        try:
            message: Message = check(decode_message(delivery.body), now, self.limits, self.accepts)
        except DecodeError as exc:
            return "undecodable", exc.cause
        except InvalidMessage as exc:
            return "invalid", str(exc)
        if auth is not None and isinstance(verified, Verified):
            refusal = auth.authorise(verified, self.queue, message)
            if refusal is not None:
                return refusal.reason, refusal.detail
        if isinstance(message, Envelope):
            return [Incoming(item.message, item.traceparent) for item in message.messages]
        traceparent = traceparent_or_empty(delivery.headers.get(TRACEPARENT_HEADER, ""))
        return [Incoming(message, traceparent)]

    def _dead_letter(self, rejected: list[tuple[Delivery, str, str]]) -> None:
        self.channel.dead_letter_many([(d, f"{category}: {why}") for d, category, why in rejected])
        self.stats.dead_lettered += len(rejected)
        for delivery, category, why in rejected:
            self._rejections[category] = self._rejections.get(category, 0) + 1
            log.debug("dead-lettered a message from %s: %s: %s", delivery.queue, category, why)
            if self.observer is not None:
                self.observer.dead_lettered(delivery.queue, category)

    def _noted(self, what: str) -> None:
        self._noticed[what] = self._noticed.get(what, 0) + 1

    def _report_rejections(self, _now: int) -> None:
        """One line per period for what was dead-lettered, and one for messages that were
        handled but made no sense (each logged at DEBUG): a flood of bad messages must not
        become a flood of log lines."""
        if self._rejections:
            counts = ", ".join(
                f"{n} {category}" for category, n in sorted(self._rejections.items())
            )
            log.warning("%s: dead-lettered messages from %s: %s", self.name, self.queue, counts)
            self._rejections.clear()
        if self._noticed:
            counts = ", ".join(f"{n} {what}" for what, n in sorted(self._noticed.items()))
            log.warning("%s: in the last period: %s (each at DEBUG)", self.name, counts)
            self._noticed.clear()

    def _run_events(self, events: deque[tuple[DriverEvent | E, Delivery | None]], now: int) -> None:
        side, observer = self.side, self.observer
        while events:
            while events:
                event, origin = events.popleft()
                self._handling = origin
                if observer is not None:
                    observer.on_incoming(event, now)
                for effect in side.handle(event, now):
                    if observer is not None:
                        observer.on_effect(effect, now)
                    events.extend((derived, origin) for derived in self._apply(effect, now))
            self._handling = None
            events.extend((event, None) for event in side.settle(now, self._records))

    def _apply(self, effect: CoreEffect | F, now: int) -> Iterable[E]:
        if isinstance(effect, Persist):
            # a core persists only its own side's records (R); Persist is shared by both
            self._records.append(cast(R, effect.record))
        elif isinstance(effect, Send):
            self._sends.append(effect)
        elif isinstance(effect, StartTimer):
            self.timers.start(effect.key, effect.deadline_ms)
        elif isinstance(effect, CancelTimer):
            self.timers.cancel(effect.key)
        elif isinstance(effect, Forget):
            pass  # the driver keeps nothing per transaction
        elif isinstance(effect, ProtocolViolation):
            self.stats.protocol_violations += 1
            self._noted("protocol violations")
            log.debug(
                "protocol violation tx_id=%s: %s",
                effect.tx_id,
                effect.description,
                extra=logs.tx(effect.tx_id),
            )
        else:
            return self.side.perform(effect, now)
        return ()

    def _flush_records(self) -> bool:
        """Make the batch's records durable; whether there were any."""
        records, self._records = self._records, []
        started_ns = time.time_ns()
        self.side.write_records(records)
        if records and self.observer is not None:
            self.observer.on_flushed(records, started_ns)
        return bool(records)

    def _publish(self) -> None:
        if not self._sends:
            return
        by_queue: dict[str, list[Send]] = {}
        for send in self._sends:
            by_queue.setdefault(send.queue, []).append(send)
        for queue, sends in by_queue.items():
            for start in range(0, len(sends), ENVELOPE_MAX):
                self._publish_to(queue, sends[start : start + ENVELOPE_MAX])
        self.stats.protocol_messages_out += len(self._sends)
        try:
            self.channel.wait_for_confirms()
        except PublishError as exc:
            returned = set(exc.routing_keys)
            for send in self._sends:
                if send.queue in returned:
                    self._unroutable(send)
        self._sends = []

    def _publish_to(self, queue: str, sends: list[Send]) -> None:
        """One AMQP message per queue and batch: an envelope when there are several, split in
        halves while it is larger than the receiver accepts."""
        try:
            message: Message
            if len(sends) == 1:
                message = sends[0].message
                body, headers = encode(message), self._headers_for(sends[0])
            else:
                items = tuple(
                    Enveloped(
                        message=send.message,
                        traceparent=(self._headers_for(send) or {}).get(TRACEPARENT_HEADER, ""),
                    )
                    for send in sends
                )
                message = Envelope(messages=items)
                body, headers = encode(message), None
                if len(body) > self.limits.max_message_bytes:
                    half = len(sends) // 2
                    self._publish_to(queue, sends[:half])
                    self._publish_to(queue, sends[half:])
                    return
            if self.auth is not None:  # once per AMQP message, envelope or not (§11)
                headers = {**(headers or {}), **self.auth.sign(body, queue, message)}
            self.channel.publish(queue, body, headers=headers)
        except PublishRefused as exc:
            log.warning("%s: cannot publish to %s (%s); dropped", self.name, queue[:80], exc)
            for send in sends:
                self._unroutable(send)
            return
        self.stats.messages_out += 1

    def republish(self) -> None:
        """After a reconnect: the last batch's messages may not have left; send them again."""
        self.side.reconnected(now_ms())
        if self._sends:
            log.info("re-publishing %d messages after reconnecting", len(self._sends))
            self._publish()

    def serve_forever(self) -> None:
        try:
            self.run()
        finally:
            self.channel.close()


def build_or_close(
    journal: J, open_channel: Callable[[], AmqpChannel], build: Callable[[AmqpChannel, J], T]
) -> T:
    """Open the channel and ``build`` the service on it and ``journal`` (connect, recover); if
    anything fails, close both, so that a failed start leaves no connection behind."""
    channel: AmqpChannel | None = None
    try:
        channel = open_channel()
        return build(channel, journal)
    except BaseException:
        if channel is not None:
            channel.close()
        journal.close()
        raise


def _no_probe() -> None:
    pass
