"""Prometheus metrics of the coordinator and the participants.

The coordinator serves them on ``TWOPHASE_METRICS_PORT`` (``twophase coordinator
--metrics-port``; default 9464, 0 disables); a participant serves its own when given a port
(``Participant(..., metrics_port=...)`` or the same variable; off by default). Every metric
family is registered once per ``CollectorRegistry``; a service may be given its own registry, so
that several services run in one process (tests) without clashing.

Coordinator
    ``twophase_transactions_total{outcome}``         decisions: committed / aborted
    ``twophase_phase_seconds{phase}``                 prepare: Begin .. decision;
                                                      commit: decision .. END (every ACK in)
    ``twophase_in_doubt``                             transactions voting or committing
    ``twophase_commit_resends_total``                 COMMITs sent again (timer, inquiry,
                                                      duplicate vote, recovery)
    ``twophase_participant_up{participant}``          1 if its heartbeats are on time, else 0
Participant (labelled ``participant``)
    ``twophase_participant_prepared``                 branches prepared and undecided
    ``twophase_participant_oldest_prepared_seconds``  age of the oldest of them
    ``twophase_votes_total{vote}``                    votes sent, by result
Both (labelled ``service``)
    ``twophase_dead_letters_total{queue,reason}``     messages dead-lettered (reason: oversized,
                                                      undecodable, invalid, poison, bad
                                                      signature, unknown key, sender may not
                                                      send this)
    ``twophase_dependency_up{dependency}``            0 during an outage (runtime.outages)
    ``twophase_batch_messages``                       deliveries per batch (histogram)
    ``twophase_log_flushes_total``, ``twophase_log_records_total``,
    ``twophase_log_flush_seconds``                    group commits of the log
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from runtime.errors import ConfigurationError
from schemas.effects import Forget, Persist, Send
from schemas.messages import Commit, Vote
from schemas.records import (
    BranchCompleted,
    BranchPrepared,
    TxAborted,
    TxBegun,
    TxCommitting,
    TxEnded,
)

DEFAULT_COORDINATOR_PORT = 9464

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_FLUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True)
class _Families:
    transactions: Counter
    phase: Histogram
    in_doubt: Gauge
    resends: Counter
    participant_up: Gauge
    prepared: Gauge
    oldest_prepared: Gauge
    votes: Counter
    batch: Histogram
    flushes: Counter
    records: Counter
    flush_seconds: Histogram
    dead_letters: Counter


_families_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = (
    weakref.WeakKeyDictionary()
)


def families(registry: CollectorRegistry | None = None) -> _Families:
    """The metric families, registered in ``registry`` (default: the global one) once."""
    registry = REGISTRY if registry is None else registry
    found = _families_by_registry.get(registry)
    if found is None:
        r = registry
        found = _Families(
            transactions=Counter(
                "twophase_transactions", "Decided transactions by outcome", ["outcome"], registry=r
            ),
            phase=Histogram(
                "twophase_phase_seconds",
                "Protocol phase latency: prepare = Begin to decision, commit = decision to END",
                ["phase"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            in_doubt=Gauge(
                "twophase_in_doubt",
                "Transactions voting or committing (undecided or un-ACKed)",
                registry=r,
            ),
            resends=Counter(
                "twophase_commit_resends",
                "COMMIT messages sent again to a participant",
                registry=r,
            ),
            participant_up=Gauge(
                "twophase_participant_up",
                "1 if the participant's heartbeats arrive on time, 0 if it is considered down",
                ["participant"],
                registry=r,
            ),
            prepared=Gauge(
                "twophase_participant_prepared",
                "Branches prepared and waiting for the decision",
                ["participant"],
                registry=r,
            ),
            oldest_prepared=Gauge(
                "twophase_participant_oldest_prepared_seconds",
                "Age of the oldest branch prepared and waiting for the decision",
                ["participant"],
                registry=r,
            ),
            votes=Counter(
                "twophase_votes", "Votes sent by result", ["participant", "vote"], registry=r
            ),
            batch=Histogram(
                "twophase_batch_messages",
                "Deliveries handled per batch",
                ["service"],
                buckets=_BATCH_BUCKETS,
                registry=r,
            ),
            flushes=Counter(
                "twophase_log_flushes", "Group commits of the log", ["service"], registry=r
            ),
            records=Counter(
                "twophase_log_records", "Records written to the log", ["service"], registry=r
            ),
            flush_seconds=Histogram(
                "twophase_log_flush_seconds",
                "Duration of one group commit of the log",
                ["service"],
                buckets=_FLUSH_BUCKETS,
                registry=r,
            ),
            dead_letters=Counter(
                "twophase_dead_letters",
                "Messages dead-lettered, by the queue they arrived on and why: oversized, "
                "undecodable, invalid, poison, or an authentication refusal (bad signature, "
                "unknown key, sender may not send this)",
                ["queue", "reason"],
                registry=r,
            ),
        )
        _families_by_registry[registry] = found
    return found


class MetricsServer:
    """The ``/metrics`` endpoint of one service (a thread of its own)."""

    def __init__(
        self, port: int, registry: CollectorRegistry | None = None, addr: str = ""
    ) -> None:
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(
                port, addr or "0.0.0.0", registry=REGISTRY if registry is None else registry
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on port {port} ({exc.strerror or exc}): "
                "set TWOPHASE_METRICS_PORT / --metrics-port to a free port, or 0 to disable"
            ) from exc
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _BatchMetrics:
    def __init__(self, f: _Families, service: str) -> None:
        self._batch = f.batch.labels(service=service)
        self._flushes = f.flushes.labels(service=service)
        self._records = f.records.labels(service=service)
        self._flush_seconds = f.flush_seconds.labels(service=service)
        self._dead_letters = f.dead_letters

    def on_flushed(self, records: Sequence[Any], started_ns: int) -> None:
        self._flushes.inc()
        self._records.inc(len(records))
        self._flush_seconds.observe((time.time_ns() - started_ns) / 1e9)

    def on_batch_end(self, messages: int) -> None:
        if messages:
            self._batch.observe(messages)

    def dead_lettered(self, queue: str, reason: str) -> None:
        """``queue`` is this service's own and ``reason`` one of a few words: bounded labels."""
        self._dead_letters.labels(queue=queue, reason=reason).inc()


class CoordinatorMetrics(_BatchMetrics):
    """Fed by the coordinator service's hooks (driver thread); gauges refreshed by a chore."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        f = families(registry)
        super().__init__(f, "coordinator")
        self._f = f
        self._committed = f.transactions.labels(outcome="committed")
        self._aborted = f.transactions.labels(outcome="aborted")
        self._prepare = f.phase.labels(phase="prepare")
        self._commit = f.phase.labels(phase="commit")
        #: tx_id -> (Begin ms, decision ms or 0)
        self._times: dict[str, tuple[int, int]] = {}
        #: tx_id -> participants COMMIT was sent to
        self._commits_sent: dict[str, set[str]] = {}

    def recovered(self, unfinished: dict[str, list[Any]]) -> None:
        """Commits re-sent after a restart count as re-sends."""
        for tx_id, records in unfinished.items():
            for record in records:
                if isinstance(record, TxCommitting):
                    self._commits_sent[tx_id] = set(record.participants)

    def on_effect(self, effect: Any, now: int) -> None:
        if isinstance(effect, Send):
            message = effect.message
            if isinstance(message, Commit):
                sent = self._commits_sent.setdefault(message.tx_id, set())
                if message.participant in sent:
                    self._f.resends.inc()
                sent.add(message.participant)
        elif isinstance(effect, Persist):
            record = effect.record
            if isinstance(record, TxBegun):
                self._times[record.tx_id] = (now, 0)
            elif isinstance(record, TxCommitting | TxAborted):
                (self._committed if isinstance(record, TxCommitting) else self._aborted).inc()
                begun, _ = self._times.get(record.tx_id, (0, 0))
                if begun:
                    self._prepare.observe((now - begun) / 1000)
                self._times[record.tx_id] = (begun, now)
            elif isinstance(record, TxEnded):
                _, decided = self._times.get(record.tx_id, (0, 0))
                if decided:
                    self._commit.observe((now - decided) / 1000)
        elif isinstance(effect, Forget):
            self._times.pop(effect.tx_id, None)
            self._commits_sent.pop(effect.tx_id, None)

    def refresh(self, in_doubt: int, liveness: dict[str, bool]) -> None:
        self._f.in_doubt.set(in_doubt)
        for participant, up in liveness.items():
            self._f.participant_up.labels(participant=participant).set(1 if up else 0)


class ParticipantMetrics(_BatchMetrics):
    def __init__(self, participant: str, registry: CollectorRegistry | None = None) -> None:
        f = families(registry)
        super().__init__(f, participant)
        self._f = f
        self._participant = participant
        self._prepared = f.prepared.labels(participant=participant)
        self._oldest = f.oldest_prepared.labels(participant=participant)
        #: tx_id -> when it was prepared (ms; the recovery time for branches found at start)
        self._prepared_at: dict[str, int] = {}

    def recovered(self, prepared: Sequence[BranchPrepared], now: int) -> None:
        for record in prepared:
            self._prepared_at.setdefault(record.tx_id, now)

    def on_effect(self, effect: Any, now: int) -> None:
        if isinstance(effect, Send):
            if isinstance(effect.message, Vote):
                vote = effect.message.vote.value
                self._f.votes.labels(participant=self._participant, vote=vote).inc()
        elif isinstance(effect, Persist):
            record = effect.record
            if isinstance(record, BranchPrepared):
                self._prepared_at[record.tx_id] = now
            elif isinstance(record, BranchCompleted):
                self._prepared_at.pop(record.tx_id, None)

    def refresh(self, now: int) -> None:
        self._prepared.set(len(self._prepared_at))
        oldest = min(self._prepared_at.values(), default=now)
        self._oldest.set(max(0, now - oldest) / 1000)
