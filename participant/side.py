"""A participant's part of its driver (``runtime.seams``): the side and the observer.

``ParticipantSide`` owns the core, the prepare log and the unit of work over the resource: it
runs the operations' handlers and finishes branches in ``settle``, once per batch (§5).
``ParticipantObserver`` traces and counts. The worker (``participant.worker``) composes them
with a driver.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Sequence

from participant.core import (
    AbortBranch,
    BranchExecuted,
    BranchHistory,
    CommitBranch,
    Effect,
    Event,
    ExecuteBranch,
    LookUpBranch,
    ParticipantCore,
    ParticipantSettings,
    Recovered,
)
from participant.log import PrepareLog
from participant.operations import OperationRegistry, OperationSpec, Refuse
from participant.resources import Branch, CommitsAtOnce, Finish, Resource
from participant.units import UnitOfWork
from runtime import logs, outages
from runtime.crashpoints import crashpoint
from runtime.errors import UnknownOperation
from runtime.metrics import ParticipantMetrics
from runtime.seams import BatchObserving
from runtime.tracing_spans import ParticipantTrace
from schemas.effects import Send
from schemas.records import PARTICIPANT_FINISHED_KINDS, BranchPrepared, ParticipantRecord

log = logging.getLogger("twophase.participant")

#: done markers (COMPLETED records) outlive the bulky PREPARED records by this factor
DONE_MARKER_FACTOR = 7
_PREPARED_KIND = str(BranchPrepared.__struct_config__.tag)

#: the effects only a participant's driver performs (on the resource, or reading the log)
OwnEffect = ExecuteBranch | CommitBranch | AbortBranch | LookUpBranch


class ParticipantSide:
    """The participant's core, its prepare log and its resource, behind ``runtime.seams.Side``."""

    def __init__(
        self,
        name: str,
        registry: OperationRegistry,
        settings: ParticipantSettings,
        resource: Resource,
        prepare_log: PrepareLog,
        unit: UnitOfWork,
        trace: ParticipantTrace | None,
        *,
        orphan_after_s: float,
        retention_s: float,
    ) -> None:
        self.name = name
        self.registry = registry
        self.settings = settings
        self.resource = resource
        self.prepare_log = prepare_log
        #: how a batch's branches and records become durable (one local transaction when the
        #: resource and the log share a database)
        self.unit = unit
        #: spans around the handlers and the finishing of branches (None: tracing off)
        self.trace = trace
        self.orphan_after_s = orphan_after_s
        self.retention_s = retention_s
        self.core = ParticipantCore(name, settings)
        self.last_orphans: list[tuple[str, float]] = []
        self._to_prepare: list[ExecuteBranch] = []
        self._to_finish: list[CommitBranch | AbortBranch] = []
        self._lookups: list[str] = []

    def dependencies(self, log_url: str) -> list[outages.Dependency]:
        """The databases this side needs (RabbitMQ is watched by the driver itself)."""
        found = [outages.Dependency("log", log_url, self.prepare_log.log.probe)]
        probe = getattr(self.resource, "probe", None)  # a resource of an older design has none
        if probe is not None:
            url = str(getattr(self.resource, "url", type(self.resource).__name__))
            found.append(outages.Dependency("resource", url, probe))
        return found

    def write_records(self, records: list[ParticipantRecord]) -> None:
        """The unit of work decides: with a shared database, the records join the batch's
        branches in ONE commit, so a branch, its record and (only after the commit) its vote or
        ACK cannot disagree."""
        self.unit.write(records)

    def abandon(self) -> None:
        self.unit.discard()  # nothing of the failed batch becomes durable

    def reset(self) -> None:
        self.unit.discard()
        self.core = ParticipantCore(self.name, self.settings)
        self._to_prepare, self._to_finish, self._lookups = [], [], []

    def reconnected(self, now: int) -> None:
        """Nothing to do: the coordinator's messages wait in our queue."""

    def on_unroutable(self, send: Send) -> list[Event]:
        return []  # a vote or ACK to nobody: the driver counts it

    def recover(self) -> list[Event]:
        """In-doubt branches inquire; prepared branches that never voted YES are rolled back."""
        prepared = self.prepare_log.unfinished_branches()
        in_resource = self.resource.prepared()
        committed = self.resource.committed([r.tx_id for r in prepared])
        if prepared or in_resource:
            log.info(
                "%s: recovering %d prepared branches (%d prepared in the resource)",
                self.name,
                len(prepared),
                len(in_resource),
            )
        # Branches finished shortly before the crash are remembered too: a redelivered PREPARE
        # or COMMIT for one is answered from the log, never run again (rule 4).
        since = time.time() - self.settings.remember_ms / 1000
        completed = self.prepare_log.completed_since(since)
        return [Recovered(prepared, in_resource, committed, completed=completed)]

    def handle(self, event: Event, now: int) -> Sequence[Effect]:
        return self.core.handle(event, now)

    def perform(self, effect: OwnEffect, now: int) -> Iterable[Event]:
        # Resource work is deferred to settle(): one local transaction per batch (§5).
        if isinstance(effect, ExecuteBranch):
            self._to_prepare.append(effect)
            return ()
        if isinstance(effect, CommitBranch | AbortBranch):
            self._to_finish.append(effect)
            return ()
        self._lookups.append(effect.tx_id)
        return ()

    def settle(self, now: int, unflushed: Sequence[ParticipantRecord]) -> Iterable[Event]:
        """Finish, then prepare, the batch's branches; their results feed the core again.

        Runs before the batch's log records are flushed and its messages published, so a
        branch is durable in the resource before its PREPARED/COMPLETED record, its vote or ACK.
        """
        self._finish_branches()
        return [*self._look_up(unflushed), *self._prepare_branches()]

    def _look_up(self, unflushed: Sequence[ParticipantRecord]) -> list[BranchHistory]:
        """One-phase questions about branches not in memory: the log and the resource answer."""
        if not self._lookups:
            return []
        tx_ids, self._lookups = self._lookups, []
        found = self.prepare_log.history(tx_ids)
        committed = self._committed(tx_ids)
        return [
            BranchHistory(
                tx, found.get(tx, []) + [r for r in unflushed if r.tx_id == tx], tx in committed
            )
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
            spec = self.registry.get(effect.operation)
            if spec is None:
                operations = ", ".join(sorted(self.registry.operations)) or "none"
                reason = (
                    f"unknown operation {effect.operation!r} on {self.name} (known: {operations})"
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

    def _commit_at_once_many(self, branches: list[Branch]) -> list[Refuse | None]:
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
            return (effect.tx_id, self.spec(effect.operation), effect.args, True)
        # An orphan found at recovery (prepared in the resource, never voted YES) comes
        # without its operation; the resource may remember it.
        operation = effect.operation or self.resource.stored_operation(effect.tx_id) or ""
        return (effect.tx_id, self.registry.get(operation), effect.args, False)

    def _traced_finish(
        self, finishing: list[CommitBranch | AbortBranch]
    ) -> contextlib.AbstractContextManager[None]:
        if self.trace is None:
            return contextlib.nullcontext()
        return self.trace.finishing(
            [(e.tx_id, e.operation, isinstance(e, CommitBranch)) for e in finishing]
        )

    def spec(self, operation: str) -> OperationSpec:
        """The registered operation, or :class:`UnknownOperation`."""
        spec = self.registry.get(operation)
        if spec is None:  # prepared by an older version of this service that had the operation
            raise UnknownOperation(f"{self.name}: operation {operation!r} is no longer registered")
        return spec

    def orphans(self, now: int) -> list[tuple[str, float]]:
        """Undecided branches ``orphan_after_s`` past their deadline, and by how long."""
        limit_ms = int(self.orphan_after_s * 1000)
        found = []
        for tx_id in self.core.in_doubt():
            overdue = now - self.core.branches[tx_id].deadline_ms
            if overdue > limit_ms:
                found.append((tx_id, overdue / 1000))
        return found

    def watch_orphans(self, now: int) -> None:
        self.last_orphans = self.orphans(now)
        for tx_id, overdue in self.last_orphans:
            log.warning(
                "%s: branch tx_id=%s is prepared and undecided %.0f s past its deadline; "
                "the coordinator does not answer its inquiries",
                self.name,
                tx_id,
                overdue,
                extra=logs.tx(tx_id, self.core.branches[tx_id].traceparent),
            )

    def collect_garbage(self, now: int) -> None:
        """Drop what finished branches no longer need; keep compact done markers longer."""
        cutoff = now / 1000 - self.retention_s
        log_table = self.prepare_log.log
        log_table.prune_finished_before(
            PARTICIPANT_FINISHED_KINDS, cutoff, only_kinds=[_PREPARED_KIND]
        )
        log_table.prune_finished_before(
            PARTICIPANT_FINISHED_KINDS, cutoff - DONE_MARKER_FACTOR * self.retention_s
        )


class ParticipantObserver(BatchObserving[ParticipantTrace, ParticipantMetrics, ParticipantRecord]):
    """Tracing and metrics of a participant (``runtime.seams.Observer``)."""

    def __init__(
        self,
        side: ParticipantSide,
        trace: ParticipantTrace | None,
        metrics: ParticipantMetrics | None,
    ) -> None:
        #: read for the operation of a branch whose handler ran
        self.side = side
        super().__init__(trace, metrics)

    def on_incoming(self, event: Event, now: int) -> None:
        if self.trace is not None:
            if isinstance(event, BranchExecuted):
                branch = self.side.core.branches.get(event.tx_id)
                operation = branch.operation if branch else ""
                self.trace.executed(event.tx_id, operation, event.ok, event.reason)
            elif isinstance(event, Recovered):
                self.trace.recovered(event.prepared)
            else:
                self.trace.on_incoming(event)
        if self.metrics is not None and isinstance(event, Recovered):
            self.metrics.recovered(event.prepared, now)

    def on_effect(self, effect: Effect, now: int) -> None:
        if self.trace is not None:
            self.trace.on_effect(effect)
        if self.metrics is not None:
            self.metrics.on_effect(effect, now)
        if self.trace is not None and isinstance(effect, CommitBranch | AbortBranch):
            self.trace.finish_requested(effect.tx_id)
