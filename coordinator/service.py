"""The coordinator service: the batch driver around ``CoordinatorCore``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from coordinator.core import (
    CoordinatorCore,
    CoordinatorSettings,
    HistoryLoaded,
    LookUp,
    Recovered,
    Unroutable,
)
from coordinator.log import DecisionLog
from runtime import logs, outages, tracing
from runtime.amqp import AmqpChannel
from runtime.driver import BatchDriver, build_or_close, now_ms
from runtime.errors import ConfigurationError
from runtime.metrics import CoordinatorMetrics, MetricsServer
from runtime.redaction import redact_url
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


class CoordinatorService(BatchDriver[CoordinatorRecord]):
    side = "coordinator"

    def __init__(self, config: CoordinatorConfig) -> None:
        """Connect to the log and the broker and rebuild the state from the log; on any failure,
        close what was opened. Nothing is served until :meth:`serve_forever`."""
        self.config = config
        self.metrics_server: MetricsServer | None = None
        build_or_close(
            DecisionLog(config.log_url),
            lambda: (config.channel_factory or AmqpChannel)(
                config.amqp_url, prefetch=config.prefetch, connection_name="twophase-coordinator"
            ),
            self._build,
        )

    def _build(self, channel: Any, journal: DecisionLog) -> None:
        config = self.config
        channel.declare_queue(topology.COORDINATOR_QUEUE)
        self.decision_log = journal
        super().__init__(
            channel,
            journal,
            queue=topology.COORDINATOR_QUEUE,
            max_batch=config.prefetch,
            limits=config.limits,
            accepts=COORDINATOR_ACCEPTS,
        )
        self.core = CoordinatorCore(config.settings, started_ms=now_ms())
        #: participants that took part in a transaction: only these get metric series, so
        #: heartbeats with made-up names cannot grow the metrics without bound
        self.known_participants: set[str] = set(config.participants)
        self._lookups: list[str] = []
        self.retention_s = config.retention_s
        self.every(60.0, self._collect_garbage)
        tracing.setup_from_env("twophase-coordinator")
        self.trace: CoordinatorTrace | None = CoordinatorTrace() if tracing.ENABLED else None
        self.metrics: CoordinatorMetrics | None = None
        if config.metrics_port or config.metrics_registry is not None:
            self.metrics = CoordinatorMetrics(config.metrics_registry)
            self.every(0.5, self._refresh_metrics)
        self.observing = self.trace is not None or self.metrics is not None
        self.recover()

    def _serve_metrics(self) -> None:
        config = self.config
        if not config.metrics_port:
            return
        try:
            self.metrics_server = MetricsServer(config.metrics_port, config.metrics_registry)
        except ConfigurationError as exc:
            if not config.metrics_best_effort:
                raise
            log.warning("no metrics endpoint: %s", exc)

    def dependencies(self) -> list[outages.Dependency]:
        return [outages.Dependency("log", self.config.log_url, self.decision_log.log.probe)]

    def metrics_registry(self) -> CollectorRegistry | None:
        return self.config.metrics_registry

    def reset(self) -> None:
        self.core = CoordinatorCore(self.config.settings, started_ms=now_ms())
        self._lookups = []

    def recover(self) -> None:
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
        self._inject(Recovered(unfinished))

    def _collect_garbage(self, now: int) -> None:
        cutoff = now / 1000 - self.retention_s
        pruned = self.decision_log.log.prune_finished_before(COORDINATOR_FINISHED_KINDS, cutoff)
        if pruned:
            log.info("pruned %d log records of transactions finished before the retention", pruned)

    def _inject(self, event: Any) -> None:
        self._injected.append(event)

    def handle(self, event: Any, now: int) -> Sequence[Any]:
        return self.core.handle(event, now)

    def perform(self, effect: Any, now: int) -> Iterable[Any]:
        if isinstance(effect, LookUp):
            self._lookups.append(effect.tx_id)
            return ()
        return super().perform(effect, now)

    def settle(self, now: int) -> Iterable[Any]:
        """Answer the batch's look-ups with one query (plus what this batch has not flushed)."""
        if not self._lookups:
            return ()
        tx_ids, self._lookups = self._lookups, []
        found = self.decision_log.history(tx_ids)
        return [
            HistoryLoaded(tx_id, found.get(tx_id, []) + self.pending_records(tx_id))
            for tx_id in tx_ids
        ]

    # ---- observation: tracing and metrics ------------------------------------------------------

    def on_incoming(self, event: Any, now: int) -> None:
        if isinstance(event, Recovered):
            if self.trace is not None:
                self.trace.recovered(event.unfinished)
            if self.metrics is not None:
                self.metrics.recovered(event.unfinished)
        elif self.trace is not None:
            self.trace.on_incoming(event)

    def on_effect(self, effect: Any, now: int) -> None:
        super().on_effect(effect, now)
        message = effect.message if isinstance(effect, Send) else None
        known = self.known_participants
        if isinstance(message, Prepare) and len(known) < _KNOWN_PARTICIPANTS_MAX:
            known.add(message.participant)

    def _refresh_metrics(self, now: int) -> None:
        if self.metrics is not None:
            core = self.core
            up = {
                p: core.participant_status(p, now) == "up"
                for p in list(core.liveness)
                if p in self.known_participants
            }
            self.metrics.refresh(len(core.in_doubt()), up)

    def serve_forever(self) -> None:
        try:
            self._serve_metrics()
            super().serve_forever()
        finally:
            if self.metrics_server is not None:
                self.metrics_server.close()
            self.decision_log.close()

    def _republish(self) -> None:
        # Called right after a reconnect: heartbeats sent while we were cut off never reached us.
        self.core.listening_again(now_ms())
        super()._republish()

    def on_unroutable(self, send: Send) -> Iterable[Any]:
        if isinstance(send.message, Prepare):
            return [Unroutable(send.message.tx_id, send.message.participant)]
        return super().on_unroutable(send)


def run_coordinator(config: CoordinatorConfig) -> None:
    """The coordinator process: connect and recover (waiting out an outage that begins during
    the start, as any later one), then serve until stopped."""
    service: CoordinatorService | None = None
    for attempt in outages.retrying(what="coordinator: starting"):
        with attempt:
            service = CoordinatorService(config)
    assert service is not None
    log.info(
        "coordinator ready: consuming %s, log at %s",
        topology.COORDINATOR_QUEUE,
        redact_url(config.log_url),
    )
    service.serve_forever()
