"""The application-facing client library: submit a transaction, get its ``Outcome``.

    with Client("amqp://guest:guest@localhost:5672/") as client:
        outcome = client.submit([Branch("bank-a", "debit", {"account": "a1", "amount": 5}),
                                 Branch("bank-b", "credit", {"account": "b7", "amount": 5})])
        if outcome.outcome is OutcomeKind.COMMITTED: ...

The client is thread-safe: one background thread owns the AMQP connection and every public
method hands work to it. ``tx_id`` makes submission idempotent: resubmitting the same ``tx_id``
(from this client or any other, before or after a coordinator restart) returns the first outcome
and never runs the transaction twice. While waiting, the client re-sends its ``Begin`` now and
then; the coordinator treats the copies as the same transaction.

A transaction the coordinator would refuse (too many branches, args too large, a bad ``tx_id``:
see :class:`schemas.validation.Limits`) raises :class:`LimitExceeded` before anything is sent;
give the client the deployment's limits (``Client(limits=runtime.config.limits())``).

When RabbitMQ goes away, the client logs one line, reconnects with the shared back-off of
:mod:`runtime.outages`, logs one line when it is back and re-sends what is waiting. A caller
waiting meanwhile keeps waiting; it gets :class:`OutcomeUnknown` only at its own ``wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from runtime import config, outages, tracing
from runtime.amqp import AmqpChannel, Delivery
from runtime.auth import Auth, Refusal, Verified
from runtime.driver import now_ms
from runtime.errors import (
    ClientClosed,
    ConfigurationError,
    ConnectionLost,
    LimitExceeded,
    OutcomeUnknown,
)
from runtime.redaction import redact_url
from schemas import topology
from schemas.codec import decode_message, encode
from schemas.errors import ProtocolError
from schemas.messages import (
    Begin,
    Branch,
    Envelope,
    Enveloped,
    Message,
    Outcome,
    OutcomeKind,
    Protocol,
    StatusQuery,
)
from schemas.permissions import Role, client_reply_queue
from schemas.validation import (
    CLIENT_ACCEPTS,
    DEFAULT_LIMITS,
    ENVELOPE_MAX,
    Limits,
    begin_problem,
    check,
    size_problem,
    tx_id_problem,
)

log = logging.getLogger("twophase.client")

#: dropped replies are reported at most once per this many seconds
_DROP_REPORT_S = 10.0

FINAL = (OutcomeKind.COMMITTED, OutcomeKind.ABORTED)
#: how often the I/O thread looks for Begins to re-send (they are re-sent seconds apart)
SCAN_EVERY_MS = 100

__all__ = [
    "AsyncClient",
    "Branch",
    "Client",
    "ClientClosed",
    "LimitExceeded",
    "Outcome",
    "OutcomeKind",
    "OutcomeUnknown",
]


#: what waits to be published: (queue, message, traceparent)
_Queued = tuple[str, Protocol, str]


@dataclass
class _Pending:
    begin: Begin
    futures: list[Future[Outcome]] = field(default_factory=list)
    resend_at_ms: int = 0
    resend_every_ms: int = 0
    traceparent: str = ""
    #: the ``submit`` span while tracing is on (``traceparent`` is its W3C context)
    span: Any = None

    def end_span(self, outcome: Outcome | None, error: BaseException | None = None) -> None:
        span, self.span = self.span, None
        if span is not None:
            tracing.end_submit(span, outcome, error)


class Client:
    def __init__(
        self,
        amqp_url: str | None = None,
        *,
        connect_attempts: int = 1,
        resend_after_s: float | None = None,
        limits: Limits = DEFAULT_LIMITS,
        key_file: str | None = None,
        keyring: str | None = None,
    ) -> None:
        """``amqp_url`` defaults to ``TWOPHASE_AMQP_URL`` (else the local broker);
        ``connect_attempts`` bounds the first connection only (later ones wait for the broker);
        ``limits`` are the deployment's (see :func:`runtime.config.limits`); ``key_file`` and
        ``keyring`` (default ``TWOPHASE_KEY_FILE``, ``TWOPHASE_KEYRING``) a client's key and
        the keys it accepts replies from (runtime.config.auth: none, authentication is off)."""
        self.amqp_url = config.amqp_url(amqp_url)
        self.limits = limits
        self._dropped, self._dropped_since = 0, 0.0
        self.client_id = uuid.uuid4().hex
        self.auth: Auth | None = config.auth(key_file, keyring, None, required=False)
        if self.auth is None:
            self.reply_queue = topology.client_queue(self.client_id)
        elif self.auth.identity.role is not Role.CLIENT:
            raise ConfigurationError(
                f"the key of a Client is a client's (client:NAME), not {self.auth.identity}'s"
            )
        else:
            # a queue its key owns: the coordinator refuses a Begin whose replies go elsewhere
            self.reply_queue = client_reply_queue(self.auth.identity.name, self.client_id)
        self._resend_after_s = resend_after_s
        self._outgoing: deque[_Queued] = deque()
        self._pending: dict[str, _Pending] = {}
        self._next_scan_ms = 0
        self._status: dict[str, list[Future[Outcome]]] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._channel: AmqpChannel | None = None
        #: AMQP messages this client published (the benchmark counts them)
        self.messages_sent = 0
        #: protocol messages inside them (an envelope carries several)
        self.protocol_messages_sent = 0
        #: tracing set up from OTEL_* by this client (a reference released on close)
        self._tracing = tracing.acquire("twophase-client")
        ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._serve, args=(ready, connect_attempts), name="twophase-client", daemon=True
        )
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._release_tracing()
            raise

    # ---- public API ------------------------------------------------------------------------

    def submit(
        self,
        branches: Sequence[Branch | tuple[str, str, dict[str, object]]],
        *,
        tx_id: str | None = None,
        timeout: float = 5.0,
        wait: float | None = None,
    ) -> Outcome:
        """Run a transaction; block until it commits or aborts.

        ``timeout`` is the vote timeout the coordinator enforces. ``wait`` bounds how long this
        call blocks (default: ``2 * timeout + 5`` seconds) before raising ``OutcomeUnknown``.
        :class:`LimitExceeded` (nothing sent) if the coordinator would refuse the transaction.
        """
        future = self.submit_future(branches, tx_id=tx_id, timeout=timeout)
        waited = wait if wait is not None else 2 * timeout + 5
        try:
            return future.result(waited)
        except FutureTimeout:
            raise OutcomeUnknown(future.tx_id, waited) from None  # type: ignore[attr-defined]

    def submit_future(
        self,
        branches: Sequence[Branch | tuple[str, str, dict[str, object]]],
        *,
        tx_id: str | None = None,
        timeout: float = 5.0,
    ) -> Future[Outcome]:
        tx_id = tx_id or uuid.uuid4().hex[: self.limits.max_tx_id_length]
        begin = Begin(
            tx_id=tx_id,
            branches=tuple(b if isinstance(b, Branch) else Branch(*b) for b in branches),
            timeout_ms=int(timeout * 1000),
            reply_to=self.reply_queue,
        )
        problem = begin_problem(begin, self.limits) or size_problem(len(encode(begin)), self.limits)
        if problem is not None:
            raise LimitExceeded(f"transaction not sent, the coordinator would refuse it: {problem}")
        future: Future[Outcome] = Future()
        future.tx_id = tx_id  # type: ignore[attr-defined]
        resend_ms = int((self._resend_after_s or timeout + 1.0) * 1000)
        with self._lock:
            pending = self._pending.get(tx_id)
            if pending is None:
                pending = _Pending(
                    begin, resend_at_ms=now_ms() + resend_ms, resend_every_ms=resend_ms
                )
                if tracing.ENABLED:
                    participants = [b.participant for b in begin.branches]
                    pending.span, pending.traceparent = tracing.start_submit(tx_id, participants)
                self._pending[tx_id] = pending
            pending.futures.append(future)
            traceparent = pending.traceparent
        self._send(topology.COORDINATOR_QUEUE, begin, traceparent)
        return future

    def status(self, tx_id: str, *, wait: float = 5.0) -> Outcome:
        """What the coordinator knows of ``tx_id``: COMMITTED, ABORTED, PENDING or UNKNOWN.

        :class:`LimitExceeded` (nothing sent) for a ``tx_id`` the coordinator would refuse."""
        problem = tx_id_problem(tx_id, self.limits)
        if problem is not None:
            raise LimitExceeded(
                f"status query not sent, the coordinator would refuse it: {problem}"
            )
        future: Future[Outcome] = Future()
        with self._lock:
            self._status.setdefault(tx_id, []).append(future)
        self._send(topology.COORDINATOR_QUEUE, StatusQuery(tx_id=tx_id, reply_to=self.reply_queue))
        try:
            return future.result(wait)
        except FutureTimeout:
            with self._lock:  # else it would be asked again after every reconnect
                waiting = self._status.get(tx_id, [])
                if future in waiting:
                    waiting.remove(future)
                if not waiting:
                    self._status.pop(tx_id, None)
            raise OutcomeUnknown(tx_id, wait) from None

    def close(self) -> None:
        self._closing.set()
        self._wake()
        self._thread.join(10)
        self._release_tracing()

    def _release_tracing(self) -> None:
        """Flush and shut down the tracer provider this client set up (if it was the last)."""
        if self._tracing:
            self._tracing = False
            tracing.release()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- the I/O thread ----------------------------------------------------------------------

    def _send(self, queue: str, message: Protocol, traceparent: str = "") -> None:
        if self._closing.is_set():
            raise ClientClosed("the client is closed")
        with self._lock:
            # Messages already waiting mean a wake-up is on its way (each waiting message woke
            # the loop, or the loop queued it itself and sends it this turn): this one rides along.
            first = not self._outgoing
            self._outgoing.append((queue, message, traceparent))
        if first:
            self._wake()

    def _wake(self) -> None:
        channel = self._channel
        if channel is not None:
            # closing or reconnecting: the loop polls again shortly
            with contextlib.suppress(Exception):
                channel.call_threadsafe(lambda: None)

    def _serve(self, ready: Future[None], connect_attempts: int) -> None:
        try:
            channel = AmqpChannel(
                self.amqp_url,
                prefetch=1024,
                connection_name=f"twophase-client-{self.client_id[:8]}",
                connect_attempts=connect_attempts,
            )
            # not the coordinator's queue: the coordinator binds it (docs/architecture.md §11.1)
            channel.declare_queue(self.reply_queue, durable=False, exclusive=True)
            channel.consume(self.reply_queue)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        self._channel = channel
        ready.set_result(None)
        try:
            while not self._closing.is_set():
                try:
                    self._turn(channel)
                except ConnectionLost as exc:
                    if not self._reconnect(channel, exc):
                        break
        finally:
            self._channel = None
            channel.close()
            self._fail_all(ClientClosed("the client was closed"))

    def _reconnect(self, channel: AmqpChannel, lost: BaseException) -> bool:
        """Wait for the broker with the shared back-off (each failed attempt is logged at DEBUG);
        whether connected again (False: the client is closing)."""
        where, since = redact_url(self.amqp_url), time.monotonic()
        log.warning(
            "client %s: lost RabbitMQ at %s (%s); reconnecting with back-off, %d transactions"
            " waiting",
            self.client_id[:8],
            where,
            outages.one_line(lost),
            len(self._pending),
        )
        retrying = outages.retrying(
            until=self._closing, what=f"client {self.client_id[:8]}: reconnecting to {where}"
        ).copy(sleep=self._closing.wait)  # close() ends the wait at once
        try:
            retrying(channel.reconnect, 1)
        except Exception:
            if self._closing.is_set():
                return False
            raise
        log.warning(
            "client %s: RabbitMQ at %s is back after %.1f s; re-sending %d Begins",
            self.client_id[:8],
            where,
            time.monotonic() - since,
            len(self._pending),
        )
        self._resend_all()
        return True

    def _drop_reply(self, why: str) -> None:
        """A reply that is no Outcome of ours is dropped; said once per period, not per reply,
        so that a flood of them cannot flood the application's log."""
        self._dropped += 1
        log.debug("client dropped a reply: %s", why)
        now = time.monotonic()
        if now - self._dropped_since >= _DROP_REPORT_S:
            log.warning("client dropped %d replies that were not valid outcomes", self._dropped)
            self._dropped, self._dropped_since = 0, now

    def _admit(self, delivery: Delivery) -> Message | Refusal | None:
        """The reply, or why it is refused (dead-lettered), or None if it is dropped. With a
        key, only the coordinator's signature makes an Outcome valid (§11): verified before
        decoding, authorised after."""
        auth, verified = self.auth, None
        if auth is not None:
            verified = auth.verify(delivery.body, delivery.headers, self.reply_queue)
            if isinstance(verified, Refusal):
                return verified
        try:
            message = check(decode_message(delivery.body), now_ms(), self.limits, CLIENT_ACCEPTS)
        except ProtocolError as exc:
            self._drop_reply(str(exc))
            return None
        if auth is not None and isinstance(verified, Verified):
            return auth.authorise(verified, self.reply_queue, message) or message
        return message

    def _turn(self, channel: AmqpChannel) -> None:
        deliveries = channel.poll(0.0 if self._outgoing else 0.1)
        refused: list[tuple[Delivery, str]] = []
        for delivery in deliveries:
            message = self._admit(delivery)
            if isinstance(message, Refusal):
                refused.append((delivery, str(message)))
                self._drop_reply(str(message))  # said once per period, not per forgery
                continue
            if message is None:
                continue
            inner = (
                [i.message for i in message.messages]
                if isinstance(message, Envelope)
                else [message]
            )
            for reply in inner:
                if isinstance(reply, Outcome):
                    self._resolve(reply)
        if refused:  # a forgery is kept for whoever investigates, and never reaches a caller
            channel.dead_letter_many(refused)
        channel.ack(deliveries)
        self._resend_due()
        with self._lock:
            batch = list(self._outgoing)
            self._outgoing.clear()
        if batch:
            self._publish(channel, batch)

    def _publish(self, channel: AmqpChannel, batch: list[_Queued]) -> None:
        """Everything queued since the last turn: one envelope per destination, or as many as
        the coordinator's limits on an envelope (count and bytes) need."""
        by_queue: dict[str, list[tuple[Protocol, str]]] = {}
        for queue, message, traceparent in batch:
            by_queue.setdefault(queue, []).append((message, traceparent))
        for queue, items in by_queue.items():
            for start in range(0, len(items), ENVELOPE_MAX):
                self._publish_to(channel, queue, items[start : start + ENVELOPE_MAX])
        # No wait for the broker's confirms: a Begin that is lost is re-sent (resend_after_s),
        # and the coordinator answers copies as one transaction. Waiting cost a broker round
        # trip per turn, half of this thread's CPU, and delayed the next submissions.
        refused = channel.take_failures()
        if refused:
            log.warning(
                "the broker refused %d publishes (to %s); they will be re-sent",
                len(refused),
                ", ".join(sorted(set(refused))),
            )

    def _publish_to(
        self, channel: AmqpChannel, queue: str, items: list[tuple[Protocol, str]]
    ) -> None:
        """One AMQP message: an envelope when there are several, split in halves while it is
        larger than the coordinator accepts (each message alone fits: submit checked it)."""
        if len(items) == 1:
            message, traceparent = items[0]
            headers = {topology.TRACEPARENT_HEADER: traceparent} if traceparent else None
            body = encode(message)
            channel.publish(queue, body, headers=self._signed(body, queue, message, headers))
        else:
            envelope = Envelope(
                messages=tuple(Enveloped(message=m, traceparent=t) for m, t in items)
            )
            body = encode(envelope)
            if len(body) > self.limits.max_message_bytes:
                half = len(items) // 2
                self._publish_to(channel, queue, items[:half])
                self._publish_to(channel, queue, items[half:])
                return
            channel.publish(queue, body, headers=self._signed(body, queue, envelope, None))
        self.messages_sent += 1
        self.protocol_messages_sent += len(items)

    def _signed(
        self, body: bytes, queue: str, message: Message, headers: dict[str, str] | None
    ) -> dict[str, str] | None:
        """``headers`` plus the signature, once per AMQP message (§11); as they are if off."""
        if self.auth is None:
            return headers
        return {**(headers or {}), **self.auth.sign(body, queue, message)}

    def _resolve(self, outcome: Outcome) -> None:
        with self._lock:
            waiting = self._status.pop(outcome.tx_id, [])
            if outcome.outcome in FINAL:
                pending = self._pending.pop(outcome.tx_id, None)
                if pending is not None:
                    waiting += pending.futures
                    pending.end_span(outcome)
        for future in waiting:
            # the caller may cancel between the check and the set: that must not kill this thread
            with contextlib.suppress(InvalidStateError):
                if not future.done():
                    future.set_result(outcome)

    def _resend_due(self) -> None:
        """Re-send overdue Begins; drop what every caller abandoned. Resends are seconds apart,
        so the pending table is scanned every SCAN_EVERY_MS, not on every turn of the loop."""
        now = now_ms()
        if now < self._next_scan_ms:
            return
        self._next_scan_ms = now + SCAN_EVERY_MS
        with self._lock:
            for pending in self._pending.values():
                if pending.futures and all(f.done() for f in pending.futures):
                    continue
                if now >= pending.resend_at_ms:
                    pending.resend_at_ms = now + pending.resend_every_ms
                    self._outgoing.append(
                        (topology.COORDINATOR_QUEUE, pending.begin, pending.traceparent)
                    )
            abandoned = [k for k, p in self._pending.items() if _abandoned(p.futures)]
            for tx_id in abandoned:
                self._pending.pop(tx_id).end_span(None, RuntimeError("abandoned by every caller"))

    def _resend_all(self) -> None:
        """After a reconnect: what was sent may be lost, and the replies certainly are (the
        reply queue went with the connection). Begins and status queries go again."""
        with self._lock:
            for pending in self._pending.values():
                self._outgoing.append(
                    (topology.COORDINATOR_QUEUE, pending.begin, pending.traceparent)
                )
            for tx_id in self._status:
                query = StatusQuery(tx_id=tx_id, reply_to=self.reply_queue)
                self._outgoing.append((topology.COORDINATOR_QUEUE, query, ""))

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            futures = [f for p in self._pending.values() for f in p.futures]
            futures += [f for fs in self._status.values() for f in fs]
            for pending in self._pending.values():
                pending.end_span(None, exc)
            self._pending.clear()
            self._status.clear()
        for future in futures:
            if not future.done():
                future.set_exception(exc)


def _abandoned(futures: Iterable[Future[Outcome]]) -> bool:
    """Every caller gave up waiting (cancelled): stop re-sending."""
    return all(f.cancelled() for f in futures)


class AsyncClient:
    """The asyncio face of :class:`Client` (the I/O still runs on the client's own thread)."""

    def __init__(self, amqp_url: str | None = None, **options: object) -> None:
        """As :class:`Client` (``limits=`` included): :class:`LimitExceeded` the same way."""
        self._client = Client(amqp_url, **options)  # type: ignore[arg-type]

    async def submit(
        self,
        branches: Sequence[Branch | tuple[str, str, dict[str, object]]],
        *,
        tx_id: str | None = None,
        timeout: float = 5.0,
        wait: float | None = None,
    ) -> Outcome:
        future = self._client.submit_future(branches, tx_id=tx_id, timeout=timeout)
        waited = wait if wait is not None else 2 * timeout + 5
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), waited)
        except TimeoutError:
            raise OutcomeUnknown(future.tx_id, waited) from None  # type: ignore[attr-defined]

    async def status(self, tx_id: str, *, wait: float = 5.0) -> Outcome:
        return await asyncio.to_thread(self._client.status, tx_id, wait=wait)

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
