"""A typed view of a :class:`~runtime.store.RecordLog`: records in, records out."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Generic, TypeVar

import msgspec
import sqlalchemy as sa

from runtime.redaction import redact_url
from runtime.store import LogRow, RecordLog, check_connection, make_engine, open_existing
from schemas.codec import encode, record_kind

R = TypeVar("R", bound=msgspec.Struct)


class Journal(Generic[R]):
    def __init__(
        self, url: str, table: str, decode: Callable[[bytes], R], *, must_exist: bool = False
    ) -> None:
        """Open the log at ``url``, creating it unless ``must_exist`` (then a missing log raises
        :class:`~runtime.errors.LogMissing`: operators read logs, services write them)."""
        if must_exist:
            engine = open_existing(url, table)
        else:
            engine = make_engine(url)
            check_connection(engine)
        self.url = url
        self.log = RecordLog(engine, table)
        self._decode = decode

    def append(self, records: Sequence[R]) -> None:
        """Group commit: every record in one transaction, durable on return."""
        self.log.append(self._rows(records))

    def append_in(self, conn: sa.Connection, records: Sequence[R]) -> None:
        """Write ``records`` in ``conn``'s open transaction; durable once the caller commits."""
        self.log.append_in(conn, self._rows(records))

    @staticmethod
    def _rows(records: Sequence[R]) -> list[LogRow]:
        return [LogRow(tx_id=r.tx_id, kind=record_kind(r), body=encode(r)) for r in records]  # type: ignore[attr-defined]

    def history(self, tx_ids: Iterable[str]) -> dict[str, list[R]]:
        return self._decoded(self.log.rows_for(tx_ids))

    def unfinished(self, finished_kinds: Collection[str]) -> dict[str, list[R]]:
        return self._decoded(self.log.unfinished(finished_kinds))

    def timeline(self, tx_id: str) -> list[tuple[float, R]]:
        rows = self.log.rows_for([tx_id]).get(tx_id, [])
        return [(row.written_at, self._decode(row.body)) for row in rows]

    def _decoded(self, grouped: dict[str, list[LogRow]]) -> dict[str, list[R]]:
        return {tx: [self._decode(row.body) for row in rows] for tx, rows in grouped.items()}

    @property
    def where(self) -> str:
        """The log's database for messages: its file, or its URL without the password."""
        url = self.log.engine.url
        if url.get_backend_name() == "sqlite" and url.database:
            return url.database
        return redact_url(url.render_as_string(hide_password=False))

    @property
    def flushes(self) -> int:
        return self.log.flushes

    def close(self) -> None:
        self.log.engine.dispose()
