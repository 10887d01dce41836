"""Events and effects that only a participant's core and its driver exchange."""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field
from typing import Any

from schemas.effects import Incoming, TimerFired
from schemas.records import BranchCompleted, BranchPrepared, ParticipantRecord


@dataclass(frozen=True, slots=True)
class ExecuteBranch:
    """Effect: run the operation's handler and leave the branch durably prepared in the resource.

    The driver answers with ``BranchExecuted``. With ``one_phase`` it may also commit the
    branch at once (durably, before it answers ``committed=True``), or decline and only prepare.
    """

    tx_id: str
    operation: str
    args: dict[str, Any]
    one_phase: bool = False


@dataclass(frozen=True, slots=True)
class CommitBranch:
    """Effect: commit the branch in the resource; durable when done; idempotent."""

    tx_id: str
    operation: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AbortBranch:
    """Effect: roll the branch back in the resource; idempotent. ``operation`` may be empty."""

    tx_id: str
    operation: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BranchExecuted:
    tx_id: str
    ok: bool
    reason: str = ""
    #: one phase: the branch is committed in the resource, not only prepared
    committed: bool = False


@dataclass(frozen=True, slots=True)
class LookUpBranch:
    """Effect: read the prepare log and the resource for ``tx_id``; feed back ``BranchHistory``.

    A one-phase question about a branch not in memory: it may have committed long ago (the log
    or the resource remembers), or never have run here."""

    tx_id: str


@dataclass(frozen=True, slots=True)
class BranchHistory:
    tx_id: str
    records: list[ParticipantRecord]
    #: the resource holds the branch committed (its own durable mark, which outlives the log)
    resource_committed: bool = False


@dataclass(frozen=True, slots=True)
class Recovered:
    """Event at start: the prepare log's unfinished branches and what the resource holds."""

    prepared: list[BranchPrepared]
    resource_prepared: Set[str] = field(default_factory=frozenset)
    resource_committed: Set[str] = field(default_factory=frozenset)
    tx_id: str = ""
    #: COMPLETED records of branches finished recently (at least those whose PREPARE deadline
    #: has not passed): a duplicate PREPARE for one must not run its handler again (rule 4)
    completed: list[BranchCompleted] = field(default_factory=list)


Event = Incoming | TimerFired | BranchExecuted | BranchHistory | Recovered
