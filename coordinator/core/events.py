"""Events and effects that only the coordinator's core and driver exchange."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.effects import Incoming, TimerFired
from schemas.records import CoordinatorRecord


@dataclass(frozen=True, slots=True)
class LookUp:
    """Effect: read the log for ``tx_id`` and feed back ``HistoryLoaded``.

    A Begin (or status query) for a transaction that is not in memory may be a resubmission of
    one finished long ago, possibly before a restart; only the log can tell (rule 7).
    """

    tx_id: str


@dataclass(frozen=True, slots=True)
class HistoryLoaded:
    tx_id: str
    records: list[CoordinatorRecord]


@dataclass(frozen=True, slots=True)
class Recovered:
    """Event at start: every unfinished transaction's records, from the log."""

    unfinished: dict[str, list[CoordinatorRecord]]
    tx_id: str = ""


@dataclass(frozen=True, slots=True)
class Unroutable:
    """Event: the broker returned a Prepare because no queue exists for the participant."""

    tx_id: str
    participant: str


Event = Incoming | TimerFired | HistoryLoaded | Recovered | Unroutable
