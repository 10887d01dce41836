"""The traffic of ``twophase fuzz``: a hostile publisher, and an observer of the dead-letter queue
and of the real traffic (which it captures for replay).

Both speak pika directly rather than through :class:`~runtime.amqp.AmqpChannel`: the hostile
publisher sets properties and header values the library never sends, and neither wants a
service's reconnect and confirm logic in the way of a flood. Each runs on its own connection.

Every hostile message carries its number in :data:`~twophase.fuzz_corpus.ID_HEADER` (a service
copies the headers to the dead letter), except those sent with no headers at all: those are
known by a digest of their queue and body, kept unique per run.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import hashlib
import random
import string
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions

from runtime import tls
from schemas import topology
from schemas.validation import CLIENT_ACCEPTS, DEFAULT_LIMITS, Limits
from twophase.chaos_faults import Broker, BrokerError, vhost_of
from twophase.fuzz_corpus import GENERATOR_KINDS, ID_HEADER, Corpus, expected_rejection

#: how many real messages per queue are kept for replay
CAPTURED_PER_QUEUE = 300
#: a frame of the broker's default frame_max; headers close to it leave no room for the reason a
#: dead letter adds
FRAME_MAX = 131_072


def digest(queue: str, body: bytes) -> bytes:
    key = hashlib.blake2b(queue.encode(), digest_size=16)
    key.update(body)
    return key.digest()


@dataclass(frozen=True)
class Target:
    """A queue hostile messages are published to, and the types it takes (the client takes
    Outcomes, and drops the rest itself: nothing there is dead-lettered)."""

    queue: str
    accepts: tuple[type[Any], ...] | None
    weight: float
    client: bool = False


@dataclass
class Sent:
    number: int
    kind: str
    headers_kind: str
    queue: str
    #: the category the service must dead-letter it with; None: it must take it
    expected: str | None
    client: bool
    size: int
    preview: bytes


@dataclass
class Ledger:
    """What was sent, and what the dead-letter queue gave back (thread-safe)."""

    sent: dict[int, Sent] = field(default_factory=dict)
    by_digest: dict[bytes, int] = field(default_factory=dict)
    #: number -> the reasons of its dead letters (one expected)
    dead: dict[int, list[str]] = field(default_factory=dict)
    #: dead letters that are no hostile message of ours: (queue, reason, first bytes)
    foreign: list[tuple[str, str, bytes]] = field(default_factory=list)
    foreign_count: int = 0
    dead_total: int = 0
    last_dead_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_sent(self, sent: Sent, key: bytes | None) -> None:
        with self.lock:
            self.sent[sent.number] = sent
            if key is not None:
                self.by_digest[key] = sent.number

    def forget(self, number: int, key: bytes | None) -> None:
        with self.lock:
            self.sent.pop(number, None)
            if key is not None:
                self.by_digest.pop(key, None)

    def record_dead(self, queue: str, headers: dict[str, Any], body: bytes) -> None:
        reason = _text(headers.get(topology.ERROR_HEADER, ""))
        number_text = _text(headers.get(ID_HEADER, ""))
        with self.lock:
            self.dead_total += 1
            self.last_dead_at = time.monotonic()
            number = int(number_text) if number_text.isdigit() else None
            if number is None:
                number = self.by_digest.get(digest(queue, body))
            if number is None or number not in self.sent:
                self.foreign_count += 1
                if len(self.foreign) < 20:
                    shown = f"{reason} [{ID_HEADER}={number_text or '-'}]"
                    self.foreign.append((queue, shown, body[:120]))
                return
            self.dead.setdefault(number, []).append(reason)

    def ours(self, headers: dict[str, Any] | None, queue: str, body: bytes) -> bool:
        if headers and ID_HEADER in headers:
            return True
        with self.lock:
            return digest(queue, body) in self.by_digest

    def expected_dead(self) -> int:
        with self.lock:
            return sum(1 for s in self.sent.values() if s.expected and not s.client)

    def matched_dead(self) -> int:
        with self.lock:
            return sum(1 for n, s in self.sent.items() if s.expected and n in self.dead)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def _connect(amqp_url: str, name: str) -> pika.BlockingConnection:
    params = tls.amqp_parameters(amqp_url)
    params.client_properties = {"connection_name": name}
    params.heartbeat = 60
    return pika.BlockingConnection(params)


class Observer(threading.Thread):
    """Drains the dead-letter queue into the ledger, and captures real messages for replay
    through a bounded queue bound to the exchange under every protocol queue's name."""

    def __init__(self, amqp_url: str, ledger: Ledger, capture_keys: list[str]) -> None:
        super().__init__(name="twophase-fuzz-observer", daemon=True)
        self.amqp_url, self.ledger, self.capture_keys = amqp_url, ledger, capture_keys
        self.captured: dict[str, list[tuple[bytes, dict[str, Any]]]] = {}
        self.captured_total = 0
        self._seen: Counter[str] = Counter()
        self._rng = random.Random(0)
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        #: connections the broker dropped (a restart, a kick): the run is not undisturbed
        self.disturbances: list[str] = []

    def start_and_wait(self, timeout_s: float = 30.0) -> None:
        self.start()
        if not self._ready.wait(timeout_s) or self.error is not None:
            raise RuntimeError(f"the fuzz observer did not start: {self.error!r}")

    def stop(self) -> None:
        self._halt.set()
        self.join(30)

    def replayable(self, queue: str, rng: random.Random) -> tuple[bytes, dict[str, Any]] | None:
        with self._lock:
            pool = self.captured.get(queue)
            return rng.choice(pool) if pool else None

    def run(self) -> None:
        """Serve until stopped; reconnect (counted) if the broker drops the connection."""
        deadline = time.monotonic() + 30
        while not self._halt.is_set():
            try:
                connection = _connect(self.amqp_url, "twophase-fuzz-observer")
            except pika.exceptions.AMQPConnectionError as exc:
                if time.monotonic() > deadline:
                    self.error = exc
                    self._ready.set()
                    return
                time.sleep(0.5)
                continue
            try:
                self._serve(connection)
            except pika.exceptions.AMQPError as exc:
                self.disturbances.append(f"observer: {exc!r}"[:200])
                deadline = time.monotonic() + 120
            except BaseException as exc:
                self.error = exc
                self._ready.set()
                return
            finally:
                if connection.is_open:
                    connection.close()

    def _serve(self, connection: pika.BlockingConnection) -> None:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=2000)
        channel.basic_consume(topology.DEAD_LETTER_QUEUE, self._on_dead, auto_ack=True)
        capture = channel.queue_declare(
            "",
            exclusive=True,
            auto_delete=True,
            arguments={"x-max-length": 2000, "x-overflow": "drop-head"},
        ).method.queue
        for key in self.capture_keys:
            channel.queue_bind(capture, topology.EXCHANGE, routing_key=key)
        channel.basic_consume(capture, self._on_captured, auto_ack=True)
        self._ready.set()
        while not self._halt.is_set():
            connection.process_data_events(time_limit=0.2)

    def _on_dead(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.ledger.record_dead(str(method.routing_key), dict(props.headers or {}), body)

    def _on_captured(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        queue = str(method.routing_key)
        headers = dict(props.headers or {})
        headers.pop("x-twophase-seq", None)  # the sender's confirm bookkeeping
        if self.ledger.ours(headers, queue, body):
            return
        with self._lock:
            # a reservoir: every real message so far has the same chance to be kept
            self._seen[queue] += 1
            self.captured_total += 1
            pool = self.captured.setdefault(queue, [])
            if len(pool) < CAPTURED_PER_QUEUE:
                pool.append((body, headers))
            else:
                slot = self._rng.randrange(self._seen[queue])
                if slot < CAPTURED_PER_QUEUE:
                    pool[slot] = (body, headers)


@dataclass
class PublisherStats:
    sent: int = 0
    bytes: int = 0
    replays: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    by_queue: Counter[str] = field(default_factory=Counter)
    by_expected: Counter[str] = field(default_factory=Counter)
    paused_s: float = 0.0
    #: what the broker itself refused (closing our channel), by error
    broker_refused: Counter[str] = field(default_factory=Counter)


class HostilePublisher:
    """Publishes hostile messages without confirms, in batches; between batches it waits while
    a protocol queue holds more than ``high_water`` messages, so that the services are flooded
    but the real traffic is not starved of all progress."""

    def __init__(
        self,
        amqp_url: str,
        ledger: Ledger,
        corpus: Corpus,
        targets: list[Target],
        observer: Observer,
        *,
        rng: random.Random,
        limits: Limits = DEFAULT_LIMITS,
        replay_share: float = 0.1,
        high_water: int = 3000,
        low_water: int = 500,
        stall_s: float = 60.0,
        now_ms: Callable[[], int],
    ) -> None:
        self.ledger, self.corpus, self.targets = ledger, corpus, targets
        self.observer, self.rng, self.limits = observer, rng, limits
        self.replay_share, self.high_water, self.low_water = replay_share, high_water, low_water
        self.stall_s = stall_s
        self.now_ms = now_ms
        self.amqp_url = amqp_url
        self.vhost = vhost_of(amqp_url)
        self.user = unquote(urlsplit(amqp_url).username or "guest")
        self.connection = _connect(amqp_url, "twophase-fuzz-hostile")
        self.channel = self.connection.channel()
        self.stats = PublisherStats()
        self.number = 0
        self.disturbances: list[str] = []
        #: the queue depths when the services stopped draining them (the flood was cut short)
        self.stalled: dict[str, int] = {}

    def close(self) -> None:
        if self.connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):  # it is going away either way
                self.connection.close()

    def _reopen(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if not self.connection.is_open:
                    self.connection = _connect(self.amqp_url, "twophase-fuzz-hostile")
                self.channel = self.connection.channel()
                return
            except pika.exceptions.AMQPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def publish(
        self, count: int, *, batch: int = 500, on_batch: Callable[[], None] | None = None
    ) -> None:
        """Publish ``count`` hostile messages."""
        left = count
        while left > 0 and not self.stalled:
            for _ in range(min(batch, left)):
                self.publish_one()
            left -= min(batch, left)
            if on_batch is not None:
                on_batch()
            self.wait_for_room()

    def publish_one(self, body: bytes | None = None, target: Target | None = None) -> Sent:
        rng = self.rng
        target = target or rng.choices(self.targets, [t.weight for t in self.targets])[0]
        kind, headers_kind = "given", "plain"
        headers: dict[str, Any] | None = {}
        replayed = None
        if body is None and rng.random() < self.replay_share:
            # mostly to the queue it was captured on; now and then to another one
            source = target if rng.random() < 0.8 else rng.choice(self.targets)
            replayed = self.observer.replayable(source.queue, rng)
        if replayed is not None:
            body, captured = replayed
            kind, headers = "replay", dict(captured)
            self.stats.replays += 1
        elif body is None:
            kind, body = self.corpus.body()
            headers_kind, headers = odd_headers(self.corpus)
        assert body is not None
        self.number += 1
        key = None
        if headers is None:
            key = digest(target.queue, body)
            if key in self.ledger.by_digest:  # its twin went without headers: this one gets some
                headers, headers_kind, key = {}, "plain", None
        if headers is not None:
            headers[ID_HEADER] = str(self.number)
        expected = None
        if not target.client:
            expected = expected_rejection(body, target.accepts, self.now_ms(), self.limits)
        sent = Sent(
            self.number,
            kind,
            headers_kind,
            target.queue,
            expected,
            target.client,
            len(body),
            body[:120],
        )
        if headers_kind == "near-frame-max":
            props = near_frame_max(headers or {})
        else:
            props = pika.BasicProperties(headers=headers, **odd_properties(rng, self.user))
        # in the ledger before it leaves: its dead letter may come back before this thread runs
        self.ledger.record_sent(sent, key)
        try:
            self.channel.basic_publish(topology.EXCHANGE, target.queue, body, props)
        except pika.exceptions.ChannelClosedByBroker as exc:
            # the broker refused it (and closed our channel): not sent, so not expected back
            self.ledger.forget(sent.number, key)
            self.stats.broker_refused[f"{exc.reply_code} {exc.reply_text[:100]}"] += 1
            self._reopen()
            return sent
        except pika.exceptions.AMQPError as exc:
            self.disturbances.append(f"publisher: {exc!r}"[:200])  # whether it left is unknown
            self._reopen()
            return sent
        stats = self.stats
        stats.sent += 1
        stats.bytes += len(body)
        stats.by_kind[kind] += 1
        stats.by_queue[target.queue] += 1
        stats.by_expected["client" if target.client else (expected or "taken")] += 1
        return sent

    def depths(self) -> dict[str, int]:
        found = {}
        for target in self.targets:
            if target.client:
                continue
            try:
                ok = self.channel.queue_declare(target.queue, passive=True)
            except pika.exceptions.AMQPError as exc:
                self.disturbances.append(f"publisher: {exc!r}"[:200])
                self._reopen()
                ok = self.channel.queue_declare(target.queue, passive=True)
            found[target.queue] = int(ok.method.message_count)
        return found

    def wait_for_room(self) -> None:
        """Between batches: when a queue is past the high water mark, until all are below the
        low one."""
        if max(self.depths().values(), default=0) > self.high_water:
            began = time.monotonic()
            self.drain(self.low_water, self.stall_s)
            self.stats.paused_s += time.monotonic() - began

    def totals(self) -> dict[str, int] | None:
        """Messages in each protocol queue, ready *and* unacknowledged: a consumer stuck in a
        reconnect loop takes its prefetch and gives it back, and the ready count alone would
        read as a drained queue most of the time. (Asked with rabbitmqctl: about 0.5 s.) None
        while the broker does not answer."""
        try:
            out = Broker.ctl(
                "list_queues", "-p", self.vhost, "name", "messages", "-q", "--no-table-headers"
            )
        except (BrokerError, subprocess.TimeoutExpired) as exc:
            self.disturbances.append(f"rabbitmqctl: {exc}"[:200])
            return None
        counts = dict(line.rsplit("\t", 1) for line in out.splitlines() if "\t" in line)
        return {t.queue: int(counts.get(t.queue, 0)) for t in self.targets if not t.client}

    def drain(self, below: int = 0, timeout_s: float = 60.0) -> bool:
        """Until every queue holds at most ``below`` messages. A queue that gets no shorter for
        ``timeout_s`` means a service stopped consuming: the flood ends there (``stalled``), and
        the checks say so."""
        lowest: dict[str, int] = {}
        progress_at: dict[str, float] = {}
        while True:
            totals = self.totals()
            if totals is not None:
                if max(totals.values(), default=0) <= below:
                    return True
                now = time.monotonic()
                for queue, total in totals.items():
                    if total < lowest.get(queue, total + 1):
                        lowest[queue], progress_at[queue] = total, now
                    elif total > below and now - progress_at[queue] > timeout_s:
                        self.stalled = totals
                        return False
            self.pause(0.2)

    def pause(self, seconds: float) -> None:
        """Sleep, serving this connection's heartbeats; a connection lost meanwhile is
        reopened (and reported)."""
        try:
            self.connection.sleep(seconds)
        except pika.exceptions.AMQPError as exc:
            self.disturbances.append(f"publisher: {exc!r}"[:200])
            self._reopen()


def odd_headers(corpus: Corpus) -> tuple[str, dict[str, Any] | None]:
    """(kind, headers): none at all, a traceparent that is garbage or not a string, forged
    twophase and broker headers, a great many of them, or plain ones."""
    for _ in range(100):
        kind, headers = _odd_headers(corpus)
        if kind not in corpus.ctx.without:
            return kind, headers
    return "plain", {}


def _odd_headers(corpus: Corpus) -> tuple[str, dict[str, Any] | None]:
    rng = corpus.rng
    op = rng.randrange(10)
    if op == 0:
        return "no-headers", None
    if op == 1:
        return "traceparent-valid", {"traceparent": corpus.traceparent()}
    if op == 2:
        value: Any = rng.choice(
            (
                "garbage",
                "",
                "00-" + "f" * 32 + "-" + "f" * 16 + "-01" + "x" * 10_000,
                12345,
                -(2**40),
                True,
                None,
                b"\xff\xfe\x00",
                ["00-a-b-01", 7],
                {"traceparent": "nested"},
            )
        )
        return "traceparent-odd", {"traceparent": value}
    if op == 3:
        return "forged-error", {topology.ERROR_HEADER: "invalid: forged", "x-death": [{}]}
    if op == 4:
        return "forged-internal", {
            "x-twophase-seq": rng.choice((1, "1", -1)),
            "x-original-routing-key": "x",
        }
    if op == 5:
        return "many-headers", {f"h{i}": "v" * rng.randint(0, 8) for i in range(1000)}
    if op == 6:
        return "header-types", {
            "a": b"\x00\xff",
            "b": [1, "x", None],
            "c": {"d": {"e": 1}},
            "d": decimal.Decimal("-1.5"),
            "e": datetime.datetime(1970, 1, 1),
        }
    if op == 7 and rng.random() < 0.1:
        # filled up to just under the frame size by the publisher, which knows its framing
        return "near-frame-max", {}
    return "plain", {}


def odd_properties(rng: random.Random, user: str) -> dict[str, Any]:
    """Odd AMQP properties besides headers; ``expiration`` and a foreign ``user_id`` are left
    out: the broker dead-letters an expired message itself, and refuses a forged user."""
    props: dict[str, Any] = {"delivery_mode": rng.choice((1, 2))}
    pool: dict[str, Callable[[], Any]] = {
        "content_type": lambda: rng.choice(("application/x-evil", "text/plain", "")),
        "content_encoding": lambda: rng.choice(("gzip", "utf-16", "evil")),
        "priority": lambda: rng.randint(0, 255),
        "correlation_id": lambda: "c" * rng.randint(0, 255),
        # (not amq.rabbitmq.reply-to: the broker closes a channel without such a consumer)
        "reply_to": lambda: rng.choice(("", "evil", topology.COORDINATOR_QUEUE)),
        "message_id": lambda: "".join(rng.choices(string.printable, k=rng.randint(0, 64))),
        "timestamp": lambda: rng.choice((0, 2**31, 2**63 - 1)),
        "type": lambda: rng.choice(("begin", "evil", "")),
        "app_id": lambda: "evil",
        "user_id": lambda: user,
    }
    for name in rng.sample(sorted(pool), rng.randint(0, 3)):
        props[name] = pool[name]()
    return props


HEADER_KINDS = (
    "no-headers",
    "traceparent-valid",
    "traceparent-odd",
    "forged-error",
    "forged-internal",
    "many-headers",
    "header-types",
    "near-frame-max",
    "plain",
)
#: every generator and header kind (what ``twophase fuzz --without`` may name)
KINDS = (*GENERATOR_KINDS, *HEADER_KINDS)


def near_frame_max(headers: dict[str, Any], slack: int = 64) -> pika.BasicProperties:
    """Properties whose header frame is ``slack`` bytes short of the broker's frame size: a
    copy with a dead-letter reason added cannot be framed any more."""
    props = pika.BasicProperties(headers={**headers, "pad": ""}, delivery_mode=2)
    # frame: 7 bytes of frame header, 14 of content header (class, weight, size, flags), 1 end
    used = 7 + 14 + len(b"".join(props.encode())) + 1
    props.headers["pad"] = "h" * (FRAME_MAX - slack - used)
    return props


def client_target(queue: str, weight: float) -> Target:
    return Target(queue, CLIENT_ACCEPTS, weight, client=True)
