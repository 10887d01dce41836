"""The coordinator's pure protocol core: no I/O, no clock; imports ``schemas`` only."""

from coordinator.core.admission import CoordinatorSettings
from coordinator.core.events import Event, HistoryLoaded, LookUp, Recovered, Unroutable
from coordinator.core.machine import (
    EVENT_KINDS,
    TRANSITIONS,
    CoordinatorCore,
    Effect,
    Transaction,
    TxState,
)

__all__ = [
    "EVENT_KINDS",
    "TRANSITIONS",
    "CoordinatorCore",
    "CoordinatorSettings",
    "Effect",
    "Event",
    "HistoryLoaded",
    "LookUp",
    "Recovered",
    "Transaction",
    "TxState",
    "Unroutable",
]
