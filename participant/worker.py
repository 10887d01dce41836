"""The participant library: register operations, then run the worker (thread or foreground).

bank = Participant("bank-a", ReservationResource("sqlite:///bank-a.db"))

@bank.operation("debit")
def debit(db, args): ...              # check and hold; raise Refuse("...") to vote NO

@debit.on_commit
def apply_debit(db, args): ...        # ReservationResource only: apply the hold

bank.start()                          # background thread; or bank.run() in the foreground
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from participant.core import (
    AbortBranch,
    BranchExecuted,
    BranchHistory,
    CommitBranch,
    ExecuteBranch,
    LookUpBranch,
    ParticipantCore,
    ParticipantSettings,
    Recovered,
)
from participant.log import PrepareLog
from participant.operations import (
    BatchHandler,
    BatchHook,
    Handler,
    OperationRegistry,
    OperationSpec,
    Refuse,
)
from participant.resources import CommitsAtOnce, Finish, Resource
from participant.units import UnitOfWork, unit_of_work
from runtime import config, logs, outages, tracing
from runtime.amqp import AmqpChannel
from runtime.crashpoints import crashpoint
from runtime.driver import BatchDriver, build_or_close
from runtime.errors import UnknownOperation
from runtime.heartbeat import HeartbeatSender
from runtime.metrics import MetricsServer, ParticipantMetrics
from runtime.tracing_spans import ParticipantTrace
from schemas import topology
from schemas.records import PARTICIPANT_FINISHED_KINDS, BranchPrepared, ParticipantRecord
from schemas.validation import PARTICIPANT_ACCEPTS, Limits

log = logging.getLogger("twophase.participant")

#: done markers (COMPLETED records) outlive the bulky PREPARED records by this factor
DONE_MARKER_FACTOR = 7
_PREPARED_KIND = str(BranchPrepared.__struct_config__.tag)


class OperationHandle:
    """What ``@participant.operation(name)`` returns: the handler, plus hook decorators."""

    def __init__(self, registry: OperationRegistry, name: str, handler: Handler) -> None:
        self._registry, self.name, self.handler = registry, name, handler

    def __call__(self, db: Any, args: dict[str, Any]) -> None:
        self.handler(db, args)

    def on_commit(self, hook: Handler) -> Handler:
        self._registry.set_hook(self.name, on_commit=hook)
        return hook

    def on_abort(self, hook: Handler) -> Handler:
        self._registry.set_hook(self.name, on_abort=hook)
        return hook

    def prepare_many(self, handler: BatchHandler) -> BatchHandler:
        """``handler(db, [args, ...]) -> [Refuse or None, ...]``: prepare a batch's branches of
        this operation at once (ReservationResource); the single handler stays the fallback."""
        self._registry.set_hook(self.name, prepare_many=handler)
        return handler

    def on_commit_many(self, hook: BatchHook) -> BatchHook:
        """``hook(db, [args, ...])``: apply many branches at once (say, one executemany)."""
        self._registry.set_hook(self.name, on_commit_many=hook)
        return hook

    def on_abort_many(self, hook: BatchHook) -> BatchHook:
        self._registry.set_hook(self.name, on_abort_many=hook)
        return hook


class Participant:
    def __init__(
        self,
        name: str,
        resource: Resource,
        *,
        amqp_url: str | None = None,
        log_url: str | None = None,
        heartbeat_interval_s: float | None = None,
        prefetch: int = 256,
        orphan_after_s: float = 60.0,
        retention_s: float = 3600.0,
        settings: ParticipantSettings | None = None,
        metrics_port: int | None = None,
        metrics_registry: CollectorRegistry | None = None,
        limits: Limits | None = None,
    ) -> None:
        topology.participant_queue(name)  # validates the name
        self.name = name
        self.resource = resource
        self.amqp_url = config.amqp_url(amqp_url)
        self.log_url = config.log_url(log_url, name)
        self.heartbeat_interval_s = heartbeat_interval_s or config.number(
            None, "TWOPHASE_HEARTBEAT_INTERVAL", 1.0, minimum=0.05, maximum=30.0
        )
        self.orphan_after_s = orphan_after_s
        self.retention_s = retention_s
        self.prefetch = prefetch
        self.settings = settings or ParticipantSettings()
        #: what inbound messages may be (every process of a deployment uses the same)
        self.limits = limits or config.limits()
        #: Prometheus endpoint (TWOPHASE_METRICS_PORT; 0, the default, serves none)
        self.metrics_port = config.metrics_port(metrics_port, 0)
        #: where the metrics are registered (default: the global registry); given one, the
        #: worker counts even without a port
        self.metrics_registry = metrics_registry
        self.registry = OperationRegistry()
        #: builds the channel: AmqpChannel, or twophase.memory's double in tests
        self.channel_factory: Callable[..., Any] | None = None
        self._worker: ParticipantWorker | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def operation(self, name: str) -> Callable[[Handler], OperationHandle]:
        def register(handler: Handler) -> OperationHandle:
            self.registry.add(OperationSpec(name, handler))
            return OperationHandle(self.registry, name, handler)

        return register

    def run(self) -> None:
        """Serve in the calling thread until :meth:`stop`: connect and recover (an outage that
        begins meanwhile is waited out, as any later one), then serve."""
        worker: ParticipantWorker | None = None
        for attempt in outages.retrying(what=f"participant {self.name}: starting"):
            with attempt:
                worker = ParticipantWorker(self)
        assert worker is not None
        self._worker = worker
        self._ready.set()
        try:
            worker.serve_forever()
        finally:
            self.resource.close()

    def start(self, *, ready_timeout: float = 30.0) -> threading.Thread:
        """Serve in a background thread; returns once the worker is consuming."""
        failure: list[BaseException] = []

        def target() -> None:
            try:
                self.run()
            except BaseException as exc:
                failure.append(exc)
                self._ready.set()
                raise

        self._thread = threading.Thread(target=target, name=f"twophase-{self.name}", daemon=True)
        self._thread.start()
        self._ready.wait(ready_timeout)
        if failure:
            raise failure[0]
        return self._thread

    def stop(self, timeout: float = 10.0) -> None:
        if self._worker is not None:
            self._worker.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def worker(self) -> ParticipantWorker | None:
        return self._worker


class ParticipantWorker(BatchDriver[ParticipantRecord]):
    side = "participant"

    def __init__(self, app: Participant) -> None:
        """Connect to the log and the broker and rebuild the state from the log and the
        resource; on any failure, close what was opened (the resource is the app's to close).
        Nothing is served until :meth:`serve_forever`."""
        self.app = app
        self.resource = app.resource
        self.resource.bind(app.name)
        build_or_close(
            PrepareLog(app.log_url, app.name),
            lambda: (app.channel_factory or AmqpChannel)(
                app.amqp_url, prefetch=app.prefetch, connection_name=f"twophase-{app.name}"
            ),
            self._build,
        )

    def _build(self, channel: Any, journal: PrepareLog) -> None:
        app = self.app
        queue = topology.participant_queue(app.name)
        channel.declare_queue(queue)
        channel.declare_queue(topology.COORDINATOR_QUEUE)
        self.prepare_log = journal
        super().__init__(
            channel,
            journal,
            queue=queue,
            max_batch=app.prefetch,
            limits=app.limits,
            accepts=PARTICIPANT_ACCEPTS,
        )
        self.core = ParticipantCore(app.name, app.settings)
        self.last_orphans: list[tuple[str, float]] = []
        #: how a batch's branches and records become durable (one local transaction when the
        #: resource and the log share a database)
        self.unit: UnitOfWork = unit_of_work(self.resource, journal, app.log_url)
        self._to_prepare: list[ExecuteBranch] = []
        self._to_finish: list[CommitBranch | AbortBranch] = []
        self._lookups: list[str] = []
        self.last_progress = time.monotonic()
        self.every(min(5.0, app.orphan_after_s), self._watch_orphans)
        self.every(60.0, self._collect_garbage)
        tracing.setup_from_env(f"twophase-{app.name}")
        self.trace: ParticipantTrace | None = (
            ParticipantTrace(app.name) if tracing.ENABLED else None
        )
        self.metrics: ParticipantMetrics | None = None
        self.metrics_server: MetricsServer | None = None
        if app.metrics_port or app.metrics_registry is not None:
            self.metrics = ParticipantMetrics(app.name, app.metrics_registry)
            self.every(0.5, self.metrics.refresh)
        self.observing = self.trace is not None or self.metrics is not None
        self.recover()

    @property
    def name(self) -> str:
        return f"participant {self.app.name}"

    def dependencies(self) -> list[outages.Dependency]:
        found = [outages.Dependency("log", self.app.log_url, self.prepare_log.log.probe)]
        probe = getattr(self.resource, "probe", None)  # a resource of an older design has none
        if probe is not None:
            url = str(getattr(self.resource, "url", type(self.resource).__name__))
            found.append(outages.Dependency("resource", url, probe))
        return found

    def metrics_registry(self) -> CollectorRegistry | None:
        return self.app.metrics_registry

    def reset(self) -> None:
        self.unit.discard()
        self.core = ParticipantCore(self.app.name, self.app.settings)
        self._to_prepare, self._to_finish, self._lookups = [], [], []

    def serve_forever(self) -> None:
        log.info(
            "participant %s ready: consuming %s, %s",
            self.app.name,
            self.queue,
            outages.describe(self.dependencies()),
        )
        heartbeats = HeartbeatSender(
            self.app.name,
            self.app.heartbeat_interval_s,
            lambda: (self.app.channel_factory or AmqpChannel)(
                self.app.amqp_url, prefetch=1, connection_name=f"twophase-{self.app.name}-heartbeat"
            ),
            lambda: self.last_progress,
        )
        if self.app.metrics_port:
            self.metrics_server = MetricsServer(self.app.metrics_port, self.app.metrics_registry)
        heartbeats.start()
        try:
            super().serve_forever()
        finally:
            heartbeats.stop()
            if self.metrics_server is not None:
                self.metrics_server.close()
            self.prepare_log.close()

    def turn(self) -> None:
        try:
            super().turn()
        except BaseException:
            self.unit.discard()  # nothing of the failed batch becomes durable
            raise
        self.last_progress = time.monotonic()

    def write_records(self, records: list[ParticipantRecord]) -> None:
        """The unit of work decides: with a shared database, the records join the batch's
        branches in ONE commit, so a branch, its record and (only after the commit) its vote or
        ACK cannot disagree."""
        self.unit.write(records)

    def recover(self) -> None:
        """In-doubt branches inquire; prepared branches that never voted YES are rolled back."""
        prepared = self.prepare_log.unfinished_branches()
        in_resource = self.resource.prepared()
        committed = self.resource.committed([r.tx_id for r in prepared])
        if prepared or in_resource:
            log.info(
                "%s: recovering %d prepared branches (%d prepared in the resource)",
                self.app.name,
                len(prepared),
                len(in_resource),
            )
        # Branches finished shortly before the crash are remembered too: a redelivered PREPARE
        # or COMMIT for one is answered from the log, never run again (rule 4).
        since = time.time() - self.app.settings.remember_ms / 1000
        completed = self.prepare_log.completed_since(since)
        self._injected.append(Recovered(prepared, in_resource, committed, completed=completed))

    def handle(self, event: Any, now: int) -> Sequence[Any]:
        return self.core.handle(event, now)

    def perform(self, effect: Any, now: int) -> Iterable[Any]:
        # Resource work is deferred to settle(): one local transaction per batch (§5).
        if isinstance(effect, ExecuteBranch):
            self._to_prepare.append(effect)
            return ()
        if isinstance(effect, CommitBranch | AbortBranch):
            self._to_finish.append(effect)
            return ()
        if isinstance(effect, LookUpBranch):
            self._lookups.append(effect.tx_id)
            return ()
        return super().perform(effect, now)

    def settle(self, now: int) -> Iterable[Any]:
        """Finish, then prepare, the batch's branches; their results feed the core again.

        Runs before the batch's log records are flushed and its messages published, so a
        branch is durable in the resource before its PREPARED/COMPLETED record, its vote or ACK.
        """
        self._finish_branches()
        return [*self._look_up(), *self._prepare_branches()]

    def _look_up(self) -> list[BranchHistory]:
        """One-phase questions about branches not in memory: the log and the resource answer."""
        if not self._lookups:
            return []
        tx_ids, self._lookups = self._lookups, []
        found = self.prepare_log.history(tx_ids)
        committed = self._committed(tx_ids)
        return [
            BranchHistory(tx, found.get(tx, []) + self.pending_records(tx), tx in committed)
            for tx in tx_ids
        ]

    def _finish_branches(self) -> None:
        if self._to_finish:
            finishing, self._to_finish = self._to_finish, []
            items = [self._finish_item(e) for e in finishing]
            with self._traced_finish(finishing):
                self.unit.finish_many(items)
            crashpoint("participant.after_commit")

    def _prepare_branches(self) -> list[BranchExecuted]:
        if not self._to_prepare:
            return []
        preparing, self._to_prepare = self._to_prepare, []
        results: list[BranchExecuted] = []
        known: list[tuple[ExecuteBranch, OperationSpec]] = []
        for effect in preparing:
            spec = self.app.registry.get(effect.operation)
            if spec is None:
                operations = ", ".join(sorted(self.app.registry.operations)) or "none"
                reason = (
                    f"unknown operation {effect.operation!r} on {self.app.name} "
                    f"(known: {operations})"
                )
                results.append(BranchExecuted(effect.tx_id, ok=False, reason=reason))
            else:
                if self.trace is not None:
                    spec = self.trace.handler(spec, effect.tx_id)
                known.append((effect, spec))
        refusals = self._run_handlers(known)
        crashpoint("participant.after_prepare")
        at_once = [
            (effect.tx_id, spec, effect.args, True)
            for (effect, spec), refusal in zip(known, refusals, strict=True)
            if refusal is None and effect.one_phase and not self.unit.commits_directly
        ]
        if at_once:
            # One phase: committed in the resource before the COMMITTED record and vote (with a
            # shared database, in the very same local transaction as that record).
            self.unit.finish_many(at_once)
        committed_before = self._committed_before(known, refusals)
        for (effect, _spec), refusal in zip(known, refusals, strict=True):
            if refusal is None or effect.tx_id in committed_before:
                results.append(BranchExecuted(effect.tx_id, ok=True, committed=effect.one_phase))
            else:
                results.append(BranchExecuted(effect.tx_id, ok=False, reason=refusal.reason))
        return results

    def _run_handlers(
        self, known: list[tuple[ExecuteBranch, OperationSpec]]
    ) -> list[Refuse | None]:
        """Prepare the branches; a resource that can commits one-phase branches at once."""
        refusals: list[Refuse | None] = [None] * len(known)
        direct: list[int] = []
        staged: list[int] = []
        for i, (effect, _spec) in enumerate(known):
            (direct if effect.one_phase and self.unit.commits_directly else staged).append(i)
        for indexes, run in ((staged, self.unit.prepare_many), (direct, self._commit_at_once_many)):
            if indexes:
                branches = [(known[i][0].tx_id, known[i][1], known[i][0].args) for i in indexes]
                for i, refusal in zip(indexes, run(branches), strict=True):
                    refusals[i] = refusal
        return refusals

    def _commit_at_once_many(
        self, branches: list[tuple[str, OperationSpec, dict[str, Any]]]
    ) -> Any:
        assert isinstance(self.resource, CommitsAtOnce)
        return self.resource.commit_at_once_many(branches)

    def _committed_before(
        self, known: list[tuple[ExecuteBranch, OperationSpec]], refusals: list[Refuse | None]
    ) -> set[str]:
        """One-phase branches refused now but committed by an earlier attempt (a crash between
        the resource's commit and the record): a NO would be taken for their outcome. The
        resource decides; if it cannot be asked, the batch fails rather than guess."""
        refused = [e.tx_id for (e, _), r in zip(known, refusals, strict=True) if r and e.one_phase]
        return self._committed(refused) if refused else set()

    def _committed(self, tx_ids: list[str]) -> set[str]:
        return self.unit.committed(tx_ids)

    def _finish_item(self, effect: CommitBranch | AbortBranch) -> Finish:
        if isinstance(effect, CommitBranch):
            return (effect.tx_id, self._spec(effect.operation), effect.args, True)
        # An orphan found at recovery (prepared in the resource, never voted YES) comes
        # without its operation; the resource may remember it.
        operation = effect.operation or self.resource.stored_operation(effect.tx_id) or ""
        return (effect.tx_id, self.app.registry.get(operation), effect.args, False)

    def _traced_finish(
        self, finishing: list[CommitBranch | AbortBranch]
    ) -> contextlib.AbstractContextManager[None]:
        if self.trace is None:
            return contextlib.nullcontext()
        return self.trace.finishing(
            [(e.tx_id, e.operation, isinstance(e, CommitBranch)) for e in finishing]
        )

    # ---- observation: tracing and metrics ------------------------------------------------------

    def on_incoming(self, event: Any, now: int) -> None:
        if self.trace is not None:
            if isinstance(event, BranchExecuted):
                branch = self.core.branches.get(event.tx_id)
                operation = branch.operation if branch else ""
                self.trace.executed(event.tx_id, operation, event.ok, event.reason)
            elif isinstance(event, Recovered):
                self.trace.recovered(event.prepared)
            else:
                self.trace.on_incoming(event)
        if self.metrics is not None and isinstance(event, Recovered):
            self.metrics.recovered(event.prepared, now)

    def on_effect(self, effect: Any, now: int) -> None:
        super().on_effect(effect, now)
        if self.trace is not None and isinstance(effect, CommitBranch | AbortBranch):
            self.trace.finish_requested(effect.tx_id)

    def _spec(self, operation: str) -> OperationSpec:
        spec = self.app.registry.get(operation)
        if spec is None:  # prepared by an older version of this service that had the operation
            raise UnknownOperation(
                f"{self.app.name}: operation {operation!r} is no longer registered"
            )
        return spec

    def orphans(self, now: int) -> list[tuple[str, float]]:
        """Undecided branches ``orphan_after_s`` past their deadline, and by how long."""
        limit_ms = int(self.app.orphan_after_s * 1000)
        found = []
        for tx_id in self.core.in_doubt():
            overdue = now - self.core.branches[tx_id].deadline_ms
            if overdue > limit_ms:
                found.append((tx_id, overdue / 1000))
        return found

    def _watch_orphans(self, now: int) -> None:
        self.last_orphans = self.orphans(now)
        for tx_id, overdue in self.last_orphans:
            log.warning(
                "%s: branch tx_id=%s is prepared and undecided %.0f s past its deadline; "
                "the coordinator does not answer its inquiries",
                self.app.name,
                tx_id,
                overdue,
                extra=logs.tx(tx_id, self.core.branches[tx_id].traceparent),
            )

    def _collect_garbage(self, now: int) -> None:
        """Drop what finished branches no longer need; keep compact done markers longer."""
        cutoff = now / 1000 - self.app.retention_s
        log_table = self.prepare_log.log
        log_table.prune_finished_before(
            PARTICIPANT_FINISHED_KINDS, cutoff, only_kinds=[_PREPARED_KIND]
        )
        log_table.prune_finished_before(
            PARTICIPANT_FINISHED_KINDS, cutoff - DONE_MARKER_FACTOR * self.app.retention_s
        )

    def status(self) -> dict[str, Any]:
        return {
            "participant": self.app.name,
            "in_doubt": self.core.in_doubt(),
            "orphans": [tx for tx, _ in self.last_orphans],
            "stats": self.stats,
        }
