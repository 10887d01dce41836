"""Partition leases in PostgreSQL, and fenced log writes (docs/architecture.md §12.2).

The I/O building block of rules L1, L2, L5 and L6 (§12.1, proven by tests/model/lease_model.py)
for the coordinator's partitioned mode: each of K partitions has one row in
``twophase_leases(partition, owner, epoch, expires_at)``, in the same database as the log it
fences (a fenced write checks the row in the log append's own transaction).

* **L1, L2** :meth:`Leases.acquire`, :meth:`Leases.renew` and :meth:`Leases.release` are each
  one conditional statement, run on its own (autocommit). An acquire takes a row that is free
  or expired and always moves its epoch up by one, also for the owner that held it before; the
  row is made by the first acquire (``INSERT ... ON CONFLICT DO UPDATE ... WHERE``, so that
  instances starting together race on nothing). A renewal or release matches only the owner and
  epoch given: a renewal that matches nothing means the lease is lost.
* **L5** :func:`fenced` locks the row ``FOR SHARE`` inside the caller's transaction and raises
  :class:`~runtime.errors.Fenced` unless it still holds the writer's epoch; the lock is held
  until that transaction ends, and an acquire (which updates the row) waits for it, so the new
  owner's recovery, reading after its acquire (L3), sees every write made under the old epoch.
  ``FOR KEY SHARE`` would not do: it does not conflict with an update that keeps the key.
  :func:`append_fenced` is the check and a :class:`~runtime.store.RecordLog` append in one
  transaction.
* **L6** ``Fenced`` is not an outage: :mod:`runtime.outages` never retries it.

Times are the database's clock, ``extract(epoch from clock_timestamp())`` (seconds since 1970,
evaluated when the statement reaches the row, after any lock wait), never the caller's: instances
on different machines compare expiries against one clock. The callers' own clocks are for
liveness only (L9): an owner counts its TTL from before the call that acquired or renewed, and
stops serving when that runs out, whatever it last heard from the database.

Rows are never deleted: the epoch of a partition only grows (L2). PostgreSQL only: the log it
fences must be there too (a SQLite log has one writer by construction). Outages are not retried
here, except within :func:`append_fenced` as :meth:`RecordLog.append` does: the caller's lease
loop decides (a renewal that cannot reach the database is not a lost lease, but the owner's own
clock ends its serving at the expiry it computed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import tenacity

from runtime import outages, pgbatch
from runtime.errors import ConfigurationError, Fenced
from runtime.store import LogRow, RecordLog, commit

__all__ = ["LeaseRow", "Leases", "append_fenced", "fenced"]

_metadata = sa.MetaData()
LEASES = sa.Table(
    "twophase_leases",
    _metadata,
    sa.Column("partition", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("owner", sa.Text(), nullable=True),
    sa.Column("epoch", sa.BigInteger(), nullable=False),
    sa.Column("expires_at", sa.Double(), nullable=False),
)

_NOW = "extract(epoch from clock_timestamp())::float8"

#: L1, L2: take a free or expired partition, epoch + 1 (the first acquire makes the row, epoch 1)
_ACQUIRE = f"""
INSERT INTO twophase_leases AS lease (partition, owner, epoch, expires_at)
VALUES (%s, %s, 1, {_NOW} + %s::float8)
ON CONFLICT (partition) DO UPDATE
   SET owner = excluded.owner, epoch = lease.epoch + 1, expires_at = {_NOW} + %s::float8
 WHERE lease.owner IS NULL OR lease.expires_at < {_NOW}
RETURNING epoch"""

#: L1: extend the lease, only while it is still this owner's at this epoch
_RENEW = f"""
UPDATE twophase_leases SET expires_at = {_NOW} + %s::float8
 WHERE partition = %s AND owner = %s AND epoch = %s
RETURNING epoch"""

#: a graceful hand-over: free now, the same epoch (the next acquire moves it up)
_RELEASE = f"""
UPDATE twophase_leases SET owner = NULL, expires_at = {_NOW}
 WHERE partition = %s AND owner = %s AND epoch = %s
RETURNING epoch"""

#: L5: in the writer's transaction; the lock holds an acquire back until that transaction ends
_FENCE = "SELECT epoch, owner FROM twophase_leases WHERE partition = %s FOR SHARE"

_ROWS = f"""
SELECT partition, owner, epoch, expires_at - {_NOW} FROM twophase_leases ORDER BY partition"""

_APPEND_ATTEMPTS = 3


@dataclass(frozen=True)
class LeaseRow:
    """One partition's lease as a status command shows it. ``remaining_s`` is the time to its
    expiry by the database's clock (negative: expired that long ago); None for a partition never
    acquired (no row yet, epoch 0)."""

    partition: int
    owner: str | None
    epoch: int
    remaining_s: float | None


class Leases:
    """The leases of partitions ``0 .. partitions - 1`` in ``engine``'s database (the log's).

    Creates the table if it is missing; instances starting together on one database may all
    try at once, and none fails for it.
    """

    def __init__(self, engine: sa.Engine, partitions: int) -> None:
        if engine.dialect.name != "postgresql":
            raise ConfigurationError(
                f"partition leases need the log in PostgreSQL, not {engine.dialect.name}"
            )
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1: {partitions}")
        self.engine = engine
        self.partitions = partitions
        try:
            _metadata.create_all(engine, checkfirst=True)
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
            # instances sharing a database start together: another made the table meanwhile
            # (PostgreSQL refuses the second CREATE TABLE with a unique or duplicate-table error)
            if not sa.inspect(engine).has_table(LEASES.name):
                raise

    def acquire(self, partition: int, owner: str, ttl_s: float) -> int | None:
        """Take ``partition`` for ``owner`` until ``ttl_s`` from now (the database's clock) if it
        is free or expired: its new epoch, greater than every epoch before (L2), also when
        ``owner`` held it before. None if another owner holds it (or ``owner`` itself, unexpired:
        a lost answer to an acquire costs one TTL). Waits for fenced writes in flight (L5)."""
        self._check(partition, owner, ttl_s)
        found = self._run(_ACQUIRE, (partition, owner, ttl_s, ttl_s))
        return int(found[0][0]) if found else None

    def renew(self, partition: int, owner: str, epoch: int, ttl_s: float) -> bool:
        """Extend the lease to ``ttl_s`` from now if ``owner`` still holds it at ``epoch``.
        False: the lease is lost (another acquired it, or it was released), and the caller
        stops serving the partition (L1, L6). A lease expired but not yet taken is renewed."""
        self._check(partition, owner, ttl_s)
        return bool(self._run(_RENEW, (ttl_s, partition, owner, epoch)))

    def release(self, partition: int, owner: str, epoch: int) -> bool:
        """Hand ``partition`` over: free from now, at the same epoch (the next acquire moves it
        up, without waiting for the expiry). Call it after the serving stopped: a fenced write
        under this epoch is refused from then on. False if ``owner`` no longer held it."""
        self._check(partition, owner)
        return bool(self._run(_RELEASE, (partition, owner, epoch)))

    def rows(self) -> list[LeaseRow]:
        """Every partition's lease, in order of partition (those never acquired included)."""
        found = {
            int(p): LeaseRow(int(p), owner, int(epoch), float(remaining))
            for p, owner, epoch, remaining in self._run(_ROWS, ())
        }
        for partition in range(self.partitions):
            found.setdefault(partition, LeaseRow(partition, None, 0, None))
        return [found[p] for p in sorted(found)]

    def _check(self, partition: int, owner: str, ttl_s: float = 1.0) -> None:
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition must be 0..{self.partitions - 1}: {partition}")
        if not owner:
            raise ValueError("owner must not be empty")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive: {ttl_s}")

    def _run(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """One statement on its own (autocommit): one round trip."""
        with self.engine.connect() as conn:
            return pgbatch.read(conn, sql, params)


def fenced(conn: sa.Connection, partition: int, epoch: int) -> None:
    """L5: in ``conn``'s open transaction, lock ``partition``'s lease row ``FOR SHARE`` (until
    the transaction ends) and raise :class:`~runtime.errors.Fenced` unless the row is still at
    ``epoch`` and held (not released). Call it before the writes of the same transaction; if the
    transaction has not begun on the server, its BEGIN travels with this query."""
    if not pgbatch.is_postgres(conn):
        raise ConfigurationError("fenced writes need PostgreSQL")
    found = pgbatch.fetch(conn, _FENCE, (partition,))
    if not found:
        raise Fenced(partition, epoch, None)
    current, owner = int(found[0][0]), found[0][1]
    if current != epoch or owner is None:
        raise Fenced(partition, epoch, current, owner)


def append_fenced(
    record_log: RecordLog, rows: Sequence[LogRow], partition: int, epoch: int
) -> None:
    """Append ``rows`` to ``record_log`` in one transaction with the fence on ``partition`` at
    ``epoch`` (:func:`fenced`): durable on return, or :class:`~runtime.errors.Fenced` and
    nothing written. Two round trips (BEGIN and the fence; the INSERT and the COMMIT).

    An outage is retried like :meth:`RecordLog.append` (a few attempts, each a new transaction
    with its own fence). A commit lost in flight may have written the rows: a retry that then
    finds the lease taken raises Fenced although they are in the log, where the new owner's
    recovery (after its acquire) finds them; the caller treats Fenced as L6 says either way, and
    publishes nothing that follows from the write.
    """
    if not rows:
        return
    retrying = outages.retrying(
        stop=tenacity.stop_after_attempt(_APPEND_ATTEMPTS),
        what=f"appending {len(rows)} fenced records to {record_log.table.name}",
    )
    retrying(_append_fenced_once, record_log, rows, partition, epoch)


def _append_fenced_once(
    record_log: RecordLog, rows: Sequence[LogRow], partition: int, epoch: int
) -> None:
    with record_log.engine.connect() as conn:
        conn.begin()
        fenced(conn, partition, epoch)
        record_log.append_in(conn, rows)
        commit(conn)
