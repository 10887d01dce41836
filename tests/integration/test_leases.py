"""Partition leases and fenced log writes on the real PostgreSQL (runtime/leases.py; rules L1, L2,
L5 and L6 of docs/architecture.md §12.1), each test on a fresh database.

Expiry is real in the first test (a short TTL, by the database's clock); elsewhere a lease is
expired by moving its ``expires_at`` into the past, as if its owner had paused past its TTL.
Threads that must block are observed blocked by the server (``pg_blocking_pids``), not by sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
import tenacity

from runtime import outages, pgbatch, store
from runtime.errors import Fenced
from runtime.leases import LEASES, Leases, append_fenced, fenced
from runtime.store import LogRow, RecordLog

pytestmark = pytest.mark.integration

WAIT_S = 10.0


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = store.make_engine(pg_url)
    yield eng
    eng.dispose()


@pytest.fixture
def leases(engine: sa.Engine) -> Leases:
    return Leases(engine, 4)


@pytest.fixture
def log(engine: sa.Engine) -> RecordLog:
    return RecordLog(engine, "twophase_coordinator_log")


def expire(engine: sa.Engine, partition: int) -> None:
    """As if the owner had paused past its TTL: the database's clock is past the expiry."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(LEASES).where(LEASES.c.partition == partition).values(expires_at=0.0)
        )


def kinds(log: RecordLog, tx_id: str) -> list[str]:
    return [row.kind for row in log.rows_for([tx_id]).get(tx_id, [])]


def backend_pid(conn: sa.Connection) -> int:
    return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def wait_until_blocking(engine: sa.Engine, holder_pid: int) -> None:
    """Return once some backend waits for a lock that ``holder_pid`` holds."""
    deadline = time.monotonic() + WAIT_S
    query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))")
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(query, {"pid": holder_pid}).scalar_one():
                return
        time.sleep(0.01)  # polling the server's view of the wait, not standing in for it
    raise AssertionError(f"nothing waited for backend {holder_pid} within {WAIT_S} s")


def in_thread(target: Callable[[], None]) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def run() -> None:
        try:
            target()
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def test_a_free_partition_is_taken_at_epoch_1_and_by_another_only_after_expiry(
    leases: Leases,
) -> None:
    started = time.monotonic()
    assert leases.acquire(0, "a", 0.5) == 1
    [row] = [r for r in leases.rows() if r.partition == 0]
    assert (row.owner, row.epoch) == ("a", 1)
    assert row.remaining_s is not None and 0 < row.remaining_s <= 0.5
    assert leases.acquire(0, "b", 5) is None  # held and not expired
    assert leases.renew(0, "b", 1, 5) is False  # not b's

    deadline = time.monotonic() + WAIT_S
    taken = None
    while taken is None and time.monotonic() < deadline:
        taken = leases.acquire(0, "b", 5)
        if taken is None:
            time.sleep(0.05)  # the TTL is the clock's to run out
    assert taken == 2
    assert time.monotonic() - started >= 0.45  # not before the expiry (by the database's clock)

    assert leases.renew(0, "a", 1, 5) is False  # a's lease is lost: a stops serving
    assert leases.release(0, "a", 1) is False
    assert leases.renew(0, "b", 2, 5) is True
    assert [(r.partition, r.owner, r.epoch) for r in leases.rows()] == [
        (0, "b", 2),
        (1, None, 0),
        (2, None, 0),
        (3, None, 0),
    ]


def test_the_same_owner_taking_its_partition_back_gets_a_new_epoch(
    engine: sa.Engine, leases: Leases
) -> None:
    assert leases.acquire(1, "a", 60) == 1
    assert leases.acquire(1, "a", 60) is None  # its own unexpired lease is not taken again
    expire(engine, 1)
    assert leases.acquire(1, "a", 60) == 2  # after a restart, say: epoch + 1 all the same
    assert leases.renew(1, "a", 1, 60) is False  # the earlier epoch is gone
    assert leases.release(1, "a", 2) is True
    assert leases.acquire(1, "a", 60) == 3
    assert leases.acquire(2, "a", 60) == 1  # partitions are independent
    for bad in (-1, 4):
        with pytest.raises(ValueError):
            leases.acquire(bad, "a", 60)


def test_a_release_hands_over_at_once_and_the_next_acquire_moves_the_epoch_up(
    leases: Leases, log: RecordLog
) -> None:
    assert leases.acquire(0, "a", 60) == 1
    assert leases.acquire(0, "b", 60) is None
    assert leases.release(0, "a", 1) is True
    [row] = [r for r in leases.rows() if r.partition == 0]
    assert (row.owner, row.epoch) == (None, 1)
    assert row.remaining_s is not None and row.remaining_s <= 0
    # released: a write under the old epoch is refused even before anyone takes the partition
    with pytest.raises(Fenced) as refused:
        append_fenced(log, [LogRow("t1", "BEGUN", b"a")], 0, 1)
    assert (refused.value.current, refused.value.owner) == (1, None)
    assert leases.acquire(0, "b", 60) == 2  # no waiting for the 60 s
    assert log.count() == 0


def test_a_stale_owner_s_fenced_write_is_refused_and_writes_nothing(
    engine: sa.Engine, leases: Leases, log: RecordLog
) -> None:
    with pytest.raises(Fenced) as unheld:
        append_fenced(log, [LogRow("t0", "BEGUN", b"a")], 3, 1)  # never acquired: no row
    assert unheld.value.current is None

    assert leases.acquire(0, "a", 60) == 1
    append_fenced(log, [LogRow("t1", "BEGUN", b"a")], 0, 1)
    expire(engine, 0)  # a pauses past its TTL
    assert leases.acquire(0, "b", 60) == 2

    with pytest.raises(Fenced) as stale:
        append_fenced(log, [LogRow("t1", "COMMIT", b"a"), LogRow("t2", "BEGUN", b"a")], 0, 1)
    assert (stale.value.partition, stale.value.epoch) == (0, 1)
    assert (stale.value.current, stale.value.owner) == (2, "b")
    assert "stop serving" in str(stale.value)
    assert kinds(log, "t1") == ["BEGUN"] and kinds(log, "t2") == []

    # in a transaction of the caller's own, with a write already sent: rolled back with it
    with engine.connect() as conn, pytest.raises(Fenced):
        conn.begin()
        conn.execute(sa.insert(log.table).values(tx_id="t3", kind="BEGUN", body=b"a", written_at=0))
        fenced(conn, 0, 1)
    assert kinds(log, "t3") == []

    append_fenced(log, [LogRow("t1", "ABORT", b"b")], 0, 2)  # the current owner writes
    assert kinds(log, "t1") == ["BEGUN", "ABORT"]


def test_an_acquire_waits_for_a_fenced_write_in_flight_and_recovery_sees_it(
    engine: sa.Engine, leases: Leases, log: RecordLog
) -> None:
    """L5: the writer's check passed (row locked FOR SHARE), its INSERT not even sent yet (it
    travels with the COMMIT); the other instance's acquire must wait for that commit, and its
    recovery, reading after the acquire (L3), must see the write."""
    assert leases.acquire(0, "a", 60) == 1
    expire(engine, 0)  # a paused past its TTL, b may take over
    acquired: list[int | None] = []
    writer = engine.connect()
    thread: threading.Thread | None = None
    try:
        writer.begin()
        fenced(writer, 0, 1)
        log.append_in(writer, [LogRow("t1", "COMMIT", b"a")])
        pid = backend_pid(writer)

        thread, done = in_thread(lambda: acquired.append(leases.acquire(0, "b", 60)))
        wait_until_blocking(engine, pid)
        assert not done.is_set() and acquired == []

        store.commit(writer)
        assert done.wait(WAIT_S), "the acquire did not go on after the commit"
        assert acquired == [2]
        assert kinds(log, "t1") == ["COMMIT"]  # recovery after the acquire sees a's decision
    finally:
        writer.close()  # rolls back what is still open, so that the acquire is not left waiting
        if thread is not None:
            thread.join(WAIT_S)
    assert thread is not None and not thread.is_alive()

    # a transaction of b's that began before c's acquire checks the row as it is now
    with engine.connect() as late, pytest.raises(Fenced) as refused:
        late.begin()
        pgbatch.fetch(late, "SELECT 1", ())  # begun on the server
        expire(engine, 0)
        assert leases.acquire(0, "c", 60) == 3  # nothing of late's holds it back: no lock yet
        fenced(late, 0, 2)
    assert refused.value.current == 3


def test_a_renewal_waits_for_the_owner_s_own_fenced_write_in_flight(
    leases: Leases, log: RecordLog, engine: sa.Engine
) -> None:
    """The lock of L5 holds back every update of the row, the owner's renewal too (for as long
    as a log append takes): the renewal goes through once the write commits."""
    assert leases.acquire(0, "a", 60) == 1
    renewed: list[bool] = []
    writer = engine.connect()
    thread: threading.Thread | None = None
    try:
        writer.begin()
        fenced(writer, 0, 1)
        thread, done = in_thread(lambda: renewed.append(leases.renew(0, "a", 1, 60)))
        wait_until_blocking(engine, backend_pid(writer))
        log.append_in(writer, [LogRow("t1", "BEGUN", b"a")])
        store.commit(writer)
        assert done.wait(WAIT_S)
        assert renewed == [True]
    finally:
        writer.close()
        if thread is not None:
            thread.join(WAIT_S)
    assert kinds(log, "t1") == ["BEGUN"]


def test_fenced_is_not_an_outage() -> None:
    refused = Fenced(0, 1, 2, "b")
    assert not outages.is_outage(refused)
    # raised while an outage was being handled, it carries that outage in its chain
    try:
        try:
            raise ConnectionResetError("server closed the connection")
        except ConnectionResetError as outage:
            raise Fenced(0, 1, 2, "b") from outage
    except Fenced as exc:
        assert exc.__cause__ is not None and outages.is_outage(exc.__cause__)
        assert not outages.is_outage(exc)

    calls = 0

    def write() -> None:
        nonlocal calls
        calls += 1
        raise refused

    retrying = outages.retrying(stop=tenacity.stop_after_attempt(5), what="a fenced write")
    with pytest.raises(Fenced):
        retrying(write)
    assert calls == 1


def test_instances_starting_together_create_the_table_and_share_the_partitions(
    pg_url: str,
) -> None:
    """Six instances on one database at once: each creates the table, then tries every
    partition; none fails, and each partition ends with exactly one owner at epoch 1."""
    barrier = threading.Barrier(6, timeout=WAIT_S)
    failures: list[BaseException] = []
    won: list[tuple[int, str, int]] = []
    lock = threading.Lock()

    def instance(name: str) -> None:
        engine = store.make_engine(pg_url)
        try:
            barrier.wait()
            leases = Leases(engine, 4)
            for partition in range(4):
                epoch = leases.acquire(partition, name, 60)
                if epoch is not None:
                    with lock:
                        won.append((partition, name, epoch))
        except BaseException as exc:  # collected, asserted below
            failures.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=instance, args=(f"i{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert sorted(p for p, _, _ in won) == [0, 1, 2, 3]
    assert {epoch for _, _, epoch in won} == {1}

    engine = store.make_engine(pg_url)
    try:
        rows = Leases(engine, 4).rows()
    finally:
        engine.dispose()
    assert sorted((p, owner, epoch) for p, owner, epoch in won) == [
        (r.partition, r.owner, r.epoch) for r in rows
    ]
