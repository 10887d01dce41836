"""A participant's pure protocol core: no I/O, no clock; imports ``schemas`` only."""

from participant.core.events import (
    AbortBranch,
    BranchExecuted,
    BranchHistory,
    CommitBranch,
    Event,
    ExecuteBranch,
    LookUpBranch,
    Recovered,
)
from participant.core.machine import (
    EVENT_KINDS,
    TRANSITIONS,
    BranchInfo,
    BranchState,
    Effect,
    ParticipantCore,
    ParticipantSettings,
)

__all__ = [
    "EVENT_KINDS",
    "TRANSITIONS",
    "AbortBranch",
    "BranchExecuted",
    "BranchHistory",
    "BranchInfo",
    "BranchState",
    "CommitBranch",
    "Effect",
    "Event",
    "ExecuteBranch",
    "LookUpBranch",
    "ParticipantCore",
    "ParticipantSettings",
    "Recovered",
]
