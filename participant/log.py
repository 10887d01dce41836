"""A participant's durable prepare log: one table per participant name."""

from __future__ import annotations

import re

from schemas.codec import decode_participant_record
from schemas.records import (
    PARTICIPANT_FINISHED_KINDS,
    BranchCompleted,
    BranchPrepared,
    ParticipantRecord,
)
from twophase.journal import Journal

_COMPLETED_KIND = str(BranchCompleted.__struct_config__.tag)


def table_name(participant: str) -> str:
    return "twophase_prepare_log_" + re.sub(r"[^A-Za-z0-9_]", "_", participant).lower()


class PrepareLog(Journal[ParticipantRecord]):
    def __init__(self, url: str, participant: str, *, must_exist: bool = False) -> None:
        super().__init__(
            url, table_name(participant), decode_participant_record, must_exist=must_exist
        )

    def completed_since(self, since: float) -> list[BranchCompleted]:
        """COMPLETED records written since ``since`` (epoch seconds): recent "done" markers."""
        rows = self.log.rows_of_kind_since(_COMPLETED_KIND, since)
        return [
            r for r in (self._decode(row.body) for row in rows) if isinstance(r, BranchCompleted)
        ]

    def unfinished_branches(self) -> list[BranchPrepared]:
        found = self.unfinished(PARTICIPANT_FINISHED_KINDS)
        return [r for records in found.values() for r in records if isinstance(r, BranchPrepared)]
