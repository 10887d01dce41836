"""The coordinator service: a batch driver given the coordinator's side (``CoordinatorCore``
and the decision log) and, when tracing or metrics are on, its observer (runtime.seams)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from coordinator.core import (
    CoordinatorCore,
    CoordinatorSettings,
    Effect,
    Event,
    HistoryLoaded,
    LookUp,
    Recovered,
    Unroutable,
)
from coordinator.log import DecisionLog
from runtime import instances, logs, outages, tracing
from runtime.amqp import AmqpChannel
from runtime.auth import Auth
from runtime.config import warn_auth_off, without_key_allowed
from runtime.driver import BatchDriver, DriverStats, build_or_close, now_ms
from runtime.errors import ConfigurationError
from runtime.metrics import CoordinatorMetrics, MetricsServer
from runtime.redaction import redact_url
from runtime.seams import BatchObserving
from runtime.tracing_spans import CoordinatorTrace
from schemas import topology
from schemas.effects import Send
from schemas.messages import Prepare
from schemas.records import COORDINATOR_FINISHED_KINDS, CoordinatorRecord, TxBegun
from schemas.validation import COORDINATOR_ACCEPTS, DEFAULT_LIMITS, Limits

log = logging.getLogger("twophase.coordinator")

_KNOWN_PARTICIPANTS_MAX = 10_000


@dataclass(frozen=True)
class CoordinatorConfig:
    amqp_url: str
    log_url: str
    prefetch: int = 512
    #: builds the channel: AmqpChannel, or twophase.memory's double in tests
    channel_factory: Callable[..., Any] | None = None
    #: how long finished transactions stay in the log: a resubmitted tx_id is answered from the
    #: log within this window (and would run as a new transaction after it)
    retention_s: float = 7 * 24 * 3600.0
    settings: CoordinatorSettings = field(default_factory=CoordinatorSettings)
    #: Prometheus endpoint port (0: none; ``twophase coordinator`` defaults to 9464)
    metrics_port: int = 0
    #: where the metrics are registered (default: the global registry); given one, the service
    #: counts even without a port (tests run several services in one process)
    metrics_registry: CollectorRegistry | None = None
    #: a port that is taken is logged and skipped instead of failing (the implicit default)
    metrics_best_effort: bool = False
    #: what inbound messages may be (every process of a deployment uses the same)
    limits: Limits = DEFAULT_LIMITS
    #: participants known from the start (``TWOPHASE_PARTICIPANTS``): they get a
    #: ``twophase_participant_up`` series at once; others once they take part in a transaction
    participants: tuple[str, ...] = ()
    #: the coordinator's key and the keys it accepts (runtime.config.auth); None: off (§11)
    auth: Auth | None = None
    #: run without a key on purpose (``--insecure``): said in the warning that auth is off
    insecure: bool = False


class CoordinatorSide:
    """The coordinator's part of its driver (``runtime.seams.Side``): the core, the decision
    log, and the look-ups that the core asks for."""

    def __init__(self, settings: CoordinatorSettings, decision_log: DecisionLog) -> None:
        self.settings = settings
        self.decision_log = decision_log
        self.core = CoordinatorCore(settings, started_ms=now_ms())
        self._lookups: list[str] = []

    def handle(self, event: Event, now: int) -> Sequence[Effect]:
        return self.core.handle(event, now)

    def perform(self, effect: LookUp, now: int) -> Iterable[Event]:
        self._lookups.append(effect.tx_id)
        return ()

    def settle(self, now: int, unflushed: Sequence[CoordinatorRecord]) -> Iterable[Event]:
        """Answer the batch's look-ups with one query (plus what this batch has not flushed)."""
        if not self._lookups:
            return ()
        tx_ids, self._lookups = self._lookups, []
        found = self.decision_log.history(tx_ids)
        return [
            HistoryLoaded(tx_id, found.get(tx_id, []) + [r for r in unflushed if r.tx_id == tx_id])
            for tx_id in tx_ids
        ]

    def write_records(self, records: list[CoordinatorRecord]) -> None:
        if records:
            self.decision_log.append(records)

    def abandon(self) -> None:
        """Nothing is staged outside the driver: the records of a failed batch are dropped."""

    def reset(self) -> None:
        self.core = CoordinatorCore(self.settings, started_ms=now_ms())
        self._lookups = []

    def recover(self) -> list[Event]:
        """Rebuild the core from the log: COMMIT without END is re-sent; no decision aborts."""
        unfinished = self.decision_log.unfinished_transactions()
        if unfinished:
            log.info("recovering %d unfinished transactions from the log", len(unfinished))
        for tx_id, records in unfinished.items():
            begun = next((r for r in records if isinstance(r, TxBegun)), None)
            log.debug(
                "recovering after %s",
                type(records[-1]).__name__,
                extra=logs.tx(tx_id, begun.traceparent if begun else ""),
            )
        return [Recovered(unfinished)]

    def reconnected(self, now: int) -> None:
        # Heartbeats sent while we were cut off never reached us.
        self.core.listening_again(now)

    def on_unroutable(self, send: Send) -> list[Event]:
        if isinstance(send.message, Prepare):
            return [Unroutable(send.message.tx_id, send.message.participant)]
        return []

    def collect_garbage(self, now: int, retention_s: float) -> None:
        cutoff = now / 1000 - retention_s
        pruned = self.decision_log.log.prune_finished_before(COORDINATOR_FINISHED_KINDS, cutoff)
        if pruned:
            log.info("pruned %d log records of transactions finished before the retention", pruned)


class CoordinatorObserver(BatchObserving[CoordinatorTrace, CoordinatorMetrics, CoordinatorRecord]):
    """Tracing and metrics of the coordinator (``runtime.seams.Observer``)."""

    def __init__(
        self,
        trace: CoordinatorTrace | None,
        metrics: CoordinatorMetrics | None,
        known_participants: set[str],
    ) -> None:
        super().__init__(trace, metrics)
        #: participants that took part in a transaction: only these get metric series, so
        #: heartbeats with made-up names cannot grow the metrics without bound
        self.known_participants = known_participants

    def on_incoming(self, event: Event, now: int) -> None:
        if isinstance(event, Recovered):
            if self.trace is not None:
                self.trace.recovered(event.unfinished)
            if self.metrics is not None:
                self.metrics.recovered(event.unfinished)
        elif self.trace is not None:
            self.trace.on_incoming(event)

    def on_effect(self, effect: Effect, now: int) -> None:
        if self.trace is not None:
            self.trace.on_effect(effect)
        if self.metrics is not None:
            self.metrics.on_effect(effect, now)
        message = effect.message if isinstance(effect, Send) else None
        known = self.known_participants
        if isinstance(message, Prepare) and len(known) < _KNOWN_PARTICIPANTS_MAX:
            known.add(message.participant)


class CoordinatorService:
    """The coordinator process: its driver, side and observer. :meth:`connect` builds one
    (configure, connect, recover); :meth:`serve_forever` serves it and closes everything."""

    def __init__(
        self,
        config: CoordinatorConfig,
        driver: BatchDriver[Event, LookUp, CoordinatorRecord],
        side: CoordinatorSide,
        observer: CoordinatorObserver | None,
    ) -> None:
        """Only assembles: :meth:`connect` does the I/O."""
        self.config = config
        self.driver = driver
        self.side = side
        self.observer = observer

    @classmethod
    def connect(cls, config: CoordinatorConfig) -> CoordinatorService:
        """Open the decision log, connect to the broker and rebuild the state from the log; on
        any failure, close what was opened. Nothing is served until :meth:`serve_forever`.
        ConfigurationError without a key unless ``insecure`` (or ``TWOPHASE_INSECURE=on``)."""
        if config.auth is None and not without_key_allowed(config.insecure):
            raise ConfigurationError(
                "the coordinator has no key: give CoordinatorConfig(auth=...) (see `twophase "
                "keys init`), or insecure=True to run without authentication"
            )
        return build_or_close(
            DecisionLog(config.log_url),
            lambda: (config.channel_factory or AmqpChannel)(
                config.amqp_url, prefetch=config.prefetch, connection_name="twophase-coordinator"
            ),
            lambda channel, journal: cls._assemble(config, channel, journal),
        )

    @classmethod
    def _assemble(
        cls, config: CoordinatorConfig, channel: AmqpChannel, journal: DecisionLog
    ) -> CoordinatorService:
        channel.declare_queue(topology.COORDINATOR_QUEUE)
        # before recovery: a second instance must stop before it reads or changes anything
        instances.serve_alone(
            channel, topology.COORDINATOR_QUEUE, journal.log.engine, "coordinator"
        )
        side = CoordinatorSide(config.settings, journal)
        tracing.setup_from_env("twophase-coordinator")
        trace = CoordinatorTrace() if tracing.ENABLED else None
        metrics = None
        if config.metrics_port or config.metrics_registry is not None:
            metrics = CoordinatorMetrics(config.metrics_registry)
        observer = None
        if trace is not None or metrics is not None:
            observer = CoordinatorObserver(trace, metrics, set(config.participants))
        watch = outages.DependencyWatch(
            "coordinator",
            [outages.Dependency("log", config.log_url, journal.log.probe)],
            config.metrics_registry,
        )
        driver = BatchDriver(
            channel,
            journal,
            side,
            name="coordinator",
            role="coordinator",
            queue=topology.COORDINATOR_QUEUE,
            watch=watch,
            observer=observer,
            max_batch=config.prefetch,
            limits=config.limits,
            accepts=COORDINATOR_ACCEPTS,
            auth=config.auth,
        )
        service = cls(config, driver, side, observer)
        driver.every(60.0, lambda now: side.collect_garbage(now, config.retention_s))
        if metrics is not None:
            driver.every(0.5, service._refresh_metrics)
        driver.recover()
        return service

    # ---- what tests and tools look at ------------------------------------------------------

    @property
    def core(self) -> CoordinatorCore:
        return self.side.core

    @property
    def decision_log(self) -> DecisionLog:
        return self.side.decision_log

    @property
    def trace(self) -> CoordinatorTrace | None:
        return self.observer.trace if self.observer is not None else None

    @property
    def metrics(self) -> CoordinatorMetrics | None:
        return self.observer.metrics if self.observer is not None else None

    @property
    def observing(self) -> bool:
        return self.driver.observing

    @property
    def channel(self) -> AmqpChannel:
        return self.driver.channel

    @property
    def queue(self) -> str:
        return self.driver.queue

    @property
    def journal(self) -> DecisionLog:
        return self.side.decision_log

    @property
    def limits(self) -> Limits:
        return self.driver.limits

    @property
    def stats(self) -> DriverStats:
        return self.driver.stats

    @property
    def watch(self) -> outages.DependencyWatch:
        return self.driver.watch

    def turn(self) -> None:
        self.driver.turn()

    def step(self) -> None:
        self.driver.step()

    def stop(self) -> None:
        self.driver.stop()

    # ---- serving ---------------------------------------------------------------------------

    def _refresh_metrics(self, now: int) -> None:
        observer = self.observer
        if observer is not None and observer.metrics is not None:
            core = self.core
            up = {
                p: core.participant_status(p, now) == "up"
                for p in list(core.liveness)
                if p in observer.known_participants
            }
            observer.metrics.refresh(len(core.in_doubt()), up)

    def _serve_metrics(self) -> MetricsServer | None:
        config = self.config
        if not config.metrics_port:
            return None
        try:
            return MetricsServer(config.metrics_port, config.metrics_registry)
        except ConfigurationError as exc:
            if not config.metrics_best_effort:
                raise
            log.warning("no metrics endpoint: %s", exc)
            return None

    def serve_forever(self) -> None:
        """The metrics endpoint, then the batch loop until stopped; whatever fails, the
        endpoint, the channel and the log are closed."""
        with contextlib.ExitStack() as opened:
            opened.callback(self.decision_log.close)
            opened.callback(self.driver.channel.close)
            server = self._serve_metrics()
            if server is not None:
                opened.callback(server.close)
            self.driver.run()


def run_coordinator(config: CoordinatorConfig) -> None:
    """The coordinator process: connect and recover (waiting out an outage that begins during
    the start, as any later one), then serve until stopped."""
    service: CoordinatorService | None = None
    for attempt in outages.retrying(what="coordinator: starting"):
        with attempt:
            service = CoordinatorService.connect(config)
    assert service is not None
    log.info(
        "coordinator ready: consuming %s, log at %s",
        topology.COORDINATOR_QUEUE,
        redact_url(config.log_url),
    )
    if config.auth is None:
        warn_auth_off(config.insecure)
    service.serve_forever()
