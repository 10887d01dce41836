"""A participant's durable prepare log: one table per participant name, never shared."""

from __future__ import annotations

import hashlib
import logging
import re

import sqlalchemy as sa

from runtime.errors import LogMissing
from runtime.journal import Journal
from runtime.store import LogRow, RecordLog
from schemas.codec import decode_participant_record
from schemas.records import (
    PARTICIPANT_FINISHED_KINDS,
    BranchCompleted,
    BranchPrepared,
    ManualAction,
    ParticipantRecord,
)

log = logging.getLogger("twophase.participant")

_COMPLETED_KIND = str(BranchCompleted.__struct_config__.tag)
_PREFIX = "twophase_prepare_log_"
_MANUAL_KIND = str(ManualAction.__struct_config__.tag)


def _folded(participant: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", participant).lower()


def table_name(participant: str) -> str:
    """The table of exactly this name. Folding a name into an SQL identifier maps ``bank-a``,
    ``bank.a``, ``bank_a`` and ``Bank-A`` alike, so a digest of the name keeps them apart; the
    folded part stays for people reading the schema, cut to fit PostgreSQL's 63 bytes."""
    digest = hashlib.blake2b(participant.encode(), digest_size=4).hexdigest()
    return f"{_PREFIX}{_folded(participant)[:30]}_{digest}"


def legacy_table_name(participant: str) -> str:
    """The table versions before the digest used, possibly shared by several names."""
    return _PREFIX + _folded(participant)


class PrepareLog(Journal[ParticipantRecord]):
    def __init__(self, url: str, participant: str, *, must_exist: bool = False) -> None:
        self.participant = participant
        try:
            super().__init__(
                url, table_name(participant), decode_participant_record, must_exist=must_exist
            )
        except LogMissing as missing:  # a log no service has opened since the upgrade?
            try:
                super().__init__(
                    url, legacy_table_name(participant), decode_participant_record, must_exist=True
                )
            except LogMissing:
                raise missing from None  # name the table of this version
            return
        if not must_exist:
            self._adopt_legacy_rows()

    def _adopt_legacy_rows(self) -> None:
        """Take this participant's records from the table of the older naming, once: only its
        own (a legacy table may hold a colliding name's too), and only into an empty table."""
        engine, legacy = self.log.engine, legacy_table_name(self.participant)
        if not sa.inspect(engine).has_table(legacy) or self.log.count() > 0:
            return
        rows = [row for rows in RecordLog(engine, legacy).unfinished(()).values() for row in rows]
        mine = {row.tx_id for row in rows if self._is_mine(row)}
        adopted = [
            LogRow(row.tx_id, row.kind, row.body)
            for row in rows
            if row.tx_id in mine and (self._is_mine(row) or row.kind == _MANUAL_KIND)
        ]
        if adopted:
            self.log.append(adopted)
            log.warning(
                "%s: took %d records from the log table %s of an older version",
                self.participant,
                len(adopted),
                legacy,
            )

    def _is_mine(self, row: LogRow) -> bool:
        record = self._decode(row.body)
        return getattr(record, "participant", None) == self.participant

    def completed_since(self, since: float) -> list[BranchCompleted]:
        """COMPLETED records written since ``since`` (epoch seconds): recent "done" markers."""
        rows = self.log.rows_of_kind_since(_COMPLETED_KIND, since)
        return [
            r for r in (self._decode(row.body) for row in rows) if isinstance(r, BranchCompleted)
        ]

    def unfinished_branches(self) -> list[BranchPrepared]:
        found = self.unfinished(PARTICIPANT_FINISHED_KINDS)
        return [r for records in found.values() for r in records if isinstance(r, BranchPrepared)]
