"""Durable log records of both sides: a tagged union on ``kind``.

Coordinator log (presumed abort): BEGUN is lazy (written with the batch, never waited for on its
own). COMMITTING is forced before any COMMIT or client answer leaves. ABORTED is forced before
the client is told (rule 7: the same ``tx_id`` must get the same answer after a restart) although
the participants would presume it. ENDED is lazy and written once every committing participant
has ACKed. ABORTED and ENDED finish a transaction: recovery only reads transactions with neither.
A one-phase BEGUN (``one_phase``) is forced, and recovery never presumes its abort: the only
participant may have committed, so the coordinator asks it (``Abort(one_phase)``).

Participant log: PREPARED is forced before a YES vote,
COMPLETED(committed) is forced before the ACK (one phase: before the COMMITTED vote, with no
PREPARED record), COMPLETED(aborted) is lazy, except as the tombstone behind a one-phase NO.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from schemas.messages import Branch


class Decision(enum.Enum):
    COMMIT = "commit"
    ABORT = "abort"


#: record kinds after which the coordinator holds nothing for a transaction
COORDINATOR_FINISHED_KINDS = frozenset({"aborted", "ended"})
#: record kinds after which a participant holds nothing for a branch
PARTICIPANT_FINISHED_KINDS = frozenset({"completed"})


class _Record(
    msgspec.Struct, frozen=True, tag_field="kind", forbid_unknown_fields=True, kw_only=True
):
    tx_id: str


# ---- coordinator log ------------------------------------------------------------------------


class TxBegun(_Record, frozen=True, tag="begun"):
    branches: tuple[Branch, ...]
    deadline_ms: int
    reply_to: str
    traceparent: str = ""
    #: the Prepare let the only participant commit at once: recovery must ask it, not presume
    one_phase: bool = False


class TxCommitting(_Record, frozen=True, tag="committing"):
    """The COMMIT decision: forced before any COMMIT or "committed" answer leaves."""

    #: participants that must ACK the COMMIT (READ_ONLY voters are excluded)
    participants: tuple[str, ...]
    reply_to: tuple[str, ...] = ()
    manual_reason: str = ""


class TxAborted(_Record, frozen=True, tag="aborted"):
    """The ABORT decision. Presumed abort would not need it; rule 7 does (see module doc)."""

    reason: str
    at_fault: str | None = None
    participants: tuple[str, ...] = ()
    manual_reason: str = ""


class TxEnded(_Record, frozen=True, tag="ended"):
    pass


# ---- participant log ------------------------------------------------------------------------


class BranchPrepared(_Record, frozen=True, tag="prepared"):
    participant: str
    operation: str
    args: dict[str, Any]
    deadline_ms: int
    traceparent: str = ""


class BranchCompleted(_Record, frozen=True, tag="completed"):
    participant: str
    decision: Decision
    reason: str = ""


# ---- both logs ------------------------------------------------------------------------------


class ManualAction(_Record, frozen=True, tag="manual"):
    """An operator's action (``twophase tx resolve``), recorded with its reason.

    ``hazard`` is non-empty when the action contradicted, or could not be checked against, the
    coordinator's decision: a heuristic outcome the operator must reconcile.
    """

    action: str
    reason: str
    operator: str = ""
    hazard: str = ""


CoordinatorRecord = TxBegun | TxCommitting | TxAborted | TxEnded | ManualAction
ParticipantRecord = BranchPrepared | BranchCompleted | ManualAction
Record = CoordinatorRecord | ParticipantRecord

COORDINATOR_RECORD_TYPES: tuple[type[Any], ...] = (
    TxBegun,
    TxCommitting,
    TxAborted,
    TxEnded,
    ManualAction,
)
PARTICIPANT_RECORD_TYPES: tuple[type[Any], ...] = (BranchPrepared, BranchCompleted, ManualAction)
