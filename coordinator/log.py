"""The coordinator's decision log (SQLite file by default, PostgreSQL by URL)."""

from __future__ import annotations

from runtime.journal import Journal
from schemas.codec import decode_coordinator_record
from schemas.records import COORDINATOR_FINISHED_KINDS, CoordinatorRecord

TABLE = "twophase_coordinator_log"


class DecisionLog(Journal[CoordinatorRecord]):
    def __init__(self, url: str, *, must_exist: bool = False) -> None:
        super().__init__(url, TABLE, decode_coordinator_record, must_exist=must_exist)

    def unfinished_transactions(self) -> dict[str, list[CoordinatorRecord]]:
        return self.unfinished(COORDINATOR_FINISHED_KINDS)
