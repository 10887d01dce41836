"""The coordinator service: the batch driver around ``CoordinatorCore``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.core import (
    CoordinatorCore,
    CoordinatorSettings,
    HistoryLoaded,
    LookUp,
    Recovered,
    Unroutable,
)
from coordinator.log import DecisionLog
from schemas import topology
from schemas.effects import Send
from schemas.messages import Prepare
from schemas.records import COORDINATOR_FINISHED_KINDS, CoordinatorRecord
from twophase.amqp import AmqpChannel
from twophase.driver import BatchDriver, now_ms

log = logging.getLogger("twophase.coordinator")


@dataclass(frozen=True)
class CoordinatorConfig:
    amqp_url: str
    log_url: str
    prefetch: int = 512
    #: how long finished transactions stay in the log: a resubmitted tx_id is answered from the
    #: log within this window (and would run as a new transaction after it)
    retention_s: float = 7 * 24 * 3600.0
    settings: CoordinatorSettings = field(default_factory=CoordinatorSettings)


class CoordinatorService(BatchDriver[CoordinatorRecord]):
    side = "coordinator"

    def __init__(self, config: CoordinatorConfig) -> None:
        journal = DecisionLog(config.log_url)
        channel = AmqpChannel(
            config.amqp_url, prefetch=config.prefetch, connection_name="twophase-coordinator"
        )
        channel.declare_queue(topology.COORDINATOR_QUEUE)
        super().__init__(
            channel, journal, queue=topology.COORDINATOR_QUEUE, max_batch=config.prefetch
        )
        self.decision_log = journal
        self.core = CoordinatorCore(config.settings, started_ms=now_ms())
        self._lookups: list[str] = []
        self.retention_s = config.retention_s
        self.every(60.0, self._collect_garbage)
        self.recover()

    def recover(self) -> None:
        """Rebuild the core from the log: COMMIT without END is re-sent; no decision aborts."""
        unfinished = self.decision_log.unfinished_transactions()
        if unfinished:
            log.info("recovering %d unfinished transactions from the log", len(unfinished))
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

    def on_unroutable(self, send: Send) -> Iterable[Any]:
        if isinstance(send.message, Prepare):
            return [Unroutable(send.message.tx_id, send.message.participant)]
        return super().on_unroutable(send)


def run_coordinator(config: CoordinatorConfig) -> None:
    service = CoordinatorService(config)
    log.info("coordinator ready: queue %s, log %s", topology.COORDINATOR_QUEUE, config.log_url)
    service.serve_forever()
