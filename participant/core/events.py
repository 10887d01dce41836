"""Events and effects that only a participant's core and its driver exchange."""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field
from typing import Any

from schemas.effects import Incoming, TimerFired
from schemas.records import BranchCompleted, BranchPrepared


@dataclass(frozen=True, slots=True)
class ExecuteBranch:
    """Effect: run the operation's handler and leave the branch durably prepared in the resource.

    The driver answers with ``BranchExecuted``.
    """

    tx_id: str
    operation: str
    args: dict[str, Any]


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


Event = Incoming | TimerFired | BranchExecuted | Recovered
