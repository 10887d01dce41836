"""How one batch's resource work and log records become durable: chosen once, at start.

* :class:`SeparateLog`: the resource and the prepare log live in different databases. The
  resource makes each branch durable itself (a prepared branch, a committed hold); the batch's
  records then go to the log in one transaction of their own (group commit).
* :class:`SharedLog`: the log lives in the resource's own database. The batch's branches and
  its records are written in ONE local transaction, committed once: a failed commit loses both,
  never one of them.

The worker calls the same five methods either way. This is also the seam where a write that
must be fenced (partition ownership: "only while my epoch is current") is checked, in the same
transaction as the records it guards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from participant.log import PrepareLog
from participant.operations import Refuse
from participant.resources import Branch, CommitsAtOnce, Finish, Resource, SharesTransactions
from runtime import store
from schemas.records import ParticipantRecord


class UnitOfWork(Protocol):
    #: one-phase branches are committed by the resource in one step (``commit_at_once_many``)
    commits_directly: bool

    def prepare_many(self, branches: Sequence[Branch]) -> list[Refuse | None]: ...
    def finish_many(self, branches: Sequence[Finish]) -> None: ...
    def committed(self, tx_ids: Iterable[str]) -> set[str]: ...
    def write(self, records: list[ParticipantRecord]) -> None: ...
    def discard(self) -> None: ...


def unit_of_work(resource: Resource, log: PrepareLog, log_url: str) -> UnitOfWork:
    """The unit of work for this resource and log: shared when they share a database."""
    if isinstance(resource, SharesTransactions) and resource.shares_database(log_url):
        return SharedLog(resource, log)
    return SeparateLog(resource, log)


class SeparateLog:
    def __init__(self, resource: Resource, log: PrepareLog) -> None:
        self.resource, self.log = resource, log
        self.commits_directly = isinstance(resource, CommitsAtOnce)

    def prepare_many(self, branches: Sequence[Branch]) -> list[Refuse | None]:
        return self.resource.prepare_many(branches)

    def finish_many(self, branches: Sequence[Finish]) -> None:
        self.resource.finish_many(branches)

    def committed(self, tx_ids: Iterable[str]) -> set[str]:
        return self.resource.committed(tx_ids)

    def write(self, records: list[ParticipantRecord]) -> None:
        """Called once per batch, also with no records, before anything of it is published."""
        if records:
            self.log.append(records)

    def discard(self) -> None:
        """Nothing is held between calls: each resource call was its own transaction."""


class SharedLog:
    commits_directly = False  # a one-phase commit joins the batch's local transaction instead

    def __init__(self, resource: SharesTransactions, log: PrepareLog) -> None:
        self.resource, self.log = resource, log
        self._open: Any = None

    def _unit(self) -> Any:
        if self._open is None:
            self._open = self.resource.begin_unit()
        return self._open

    def prepare_many(self, branches: Sequence[Branch]) -> list[Refuse | None]:
        return self.resource.prepare_many_in(self._unit(), branches)

    def finish_many(self, branches: Sequence[Finish]) -> None:
        self.resource.finish_many_in(self._unit(), branches)

    def committed(self, tx_ids: Iterable[str]) -> set[str]:
        # read inside the batch's transaction: a second connection would wait for its lock
        return self.resource.committed_in(self._unit(), tx_ids)

    def write(self, records: list[ParticipantRecord]) -> None:
        """The batch's branches and records in ONE commit (on PostgreSQL, one round trip)."""
        unit = self._open
        if unit is None:  # no resource work in this batch: the records alone
            if records:
                self.log.append(records)
            return
        try:
            self.log.append_in(unit, records)
            store.commit(unit)
        finally:
            self.discard()

    def discard(self) -> None:
        """Roll back what was not committed: nothing of a failed batch becomes durable."""
        unit, self._open = self._open, None
        if unit is not None:
            # the connection may be gone with the outage that failed the batch
            with contextlib.suppress(Exception):
                unit.close()
