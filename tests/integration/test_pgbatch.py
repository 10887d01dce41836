"""runtime.pgbatch on a real PostgreSQL: round trips counted, SQLAlchemy's transactions kept.

Round trips are counted in libpq's protocol trace: the server ends each one with a
ReadyForQuery message (a pipeline's Sync, or a query outside a pipeline).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
import sqlalchemy as sa

from runtime import outages, pgbatch, store
from runtime.store import LogRow, RecordLog, make_engine

pytestmark = pytest.mark.integration

IDLE = psycopg.pq.TransactionStatus.IDLE


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    """An engine of the logs on a database of its own (tests/conftest.py)."""
    eng = make_engine(pg_url)
    yield eng
    eng.dispose()


@pytest.fixture
def table(engine: sa.Engine) -> Iterator[str]:
    name = f"test_pgbatch_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {name} (x int)")
    yield name
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {name}")


def pgconn(conn: sa.Connection) -> psycopg.pq.abc.PGconn:
    """The libpq connection under a pooled SQLAlchemy connection."""
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    return driver.pgconn


def round_trips(engine: sa.Engine, work: Callable[[], object]) -> int:
    """Round trips ``work`` makes on the engine's one pooled connection."""
    fd, path = tempfile.mkstemp()
    try:
        with engine.connect() as conn:  # the pool holds this one connection afterwards
            pgconn(conn).trace(fd)
        work()
        with engine.connect() as conn:
            pgconn(conn).untrace()
        with open(path) as trace:
            return sum("\tB\t" in line and "ReadyForQuery" in line for line in trace)
    finally:
        os.close(fd)
        os.unlink(path)


def values(engine: sa.Engine, table: str) -> list[int]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql(f"SELECT x FROM {table} ORDER BY x").scalars())


def test_a_log_append_is_one_round_trip(engine: sa.Engine) -> None:
    log = RecordLog(engine, f"test_pgbatch_log_{uuid.uuid4().hex[:10]}")
    try:
        batch = [LogRow("a", "BEGUN", b"x"), LogRow("b", "BEGUN", b"y")]
        assert round_trips(engine, lambda: log.append(batch)) == 1  # BEGIN, INSERT, COMMIT
        assert round_trips(engine, lambda: log.rows_for(["a"])) == 1  # autocommit read
        assert [row.body for row in log.rows_for(["a", "b"])["b"]] == [b"y"]
    finally:
        log.table.drop(engine)


def test_a_query_carries_the_begin_and_the_writes_carry_the_commit(
    engine: sa.Engine, table: str
) -> None:
    def unit() -> None:
        with engine.connect() as conn:
            conn.begin()
            assert pgbatch.fetch(conn, f"SELECT count(*) FROM {table}", ()) == [(0,)]
            pgbatch.defer(conn, (f"INSERT INTO {table} VALUES (%s)", (1,)))
            pgbatch.defer(conn, (f"INSERT INTO {table} VALUES (%s)", (2,)))
            store.commit(conn)

    assert round_trips(engine, unit) == 2
    assert values(engine, table) == [1, 2]


def test_sqlalchemy_transactions_stay_atomic(engine: sa.Engine, table: str) -> None:
    """psycopg runs in autocommit under these engines: a statement SQLAlchemy runs in a
    transaction must still open one on the server."""
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1)")
        assert pgconn(conn).transaction_status != IDLE
        raise RuntimeError("undo")
    assert values(engine, table) == []
    with engine.connect() as conn:
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES (2)")
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES (3)")
        conn.commit()
    with engine.connect() as conn:  # rows written by one transaction share its xmin
        writers = f"SELECT count(DISTINCT xmin::text) FROM {table}"
        assert conn.exec_driver_sql(writers).scalar_one() == 1
    with engine.connect() as conn:
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES (4)")
        savepoint = conn.begin_nested()
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES (5)")
        savepoint.rollback()
        conn.commit()
    assert values(engine, table) == [2, 3, 4]


def test_reads_marked_autocommit_open_no_transaction(engine: sa.Engine) -> None:
    with engine.connect() as plain:
        conn = plain.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("SELECT 1")
        assert pgconn(conn).transaction_status == IDLE


def test_a_rollback_drops_what_was_deferred(engine: sa.Engine, table: str) -> None:
    with engine.connect() as conn:
        conn.begin()
        pgbatch.fetch(conn, "SELECT 1", ())
        pgbatch.defer(conn, (f"INSERT INTO {table} VALUES (%s)", (1,)))
        conn.rollback()
        conn.begin()
        pgbatch.defer(conn, (f"INSERT INTO {table} VALUES (%s)", (2,)))
        conn.commit()  # a plain commit sends what is deferred
    assert values(engine, table) == [2]


def test_nothing_to_commit_costs_no_round_trip(engine: sa.Engine) -> None:
    def empty_unit() -> None:
        with engine.connect() as conn:
            conn.begin()
            store.commit(conn)

    assert round_trips(engine, empty_unit) == 0


def test_a_failed_statement_or_parameter_leaves_the_connection_usable(
    engine: sa.Engine, table: str
) -> None:
    with engine.connect() as conn:
        conn.begin()
        pgbatch.defer(conn, (f"INSERT INTO {table} VALUES (%s)", (1,)))
        pgbatch.defer(conn, (f"INSERT INTO {table} VALUES (%s)", ("not a number",)))
        with pytest.raises(sa.exc.DBAPIError, match="invalid input syntax"):
            store.commit(conn)
        conn.rollback()
        conn.begin()
        with pytest.raises(sa.exc.DBAPIError, match="cannot adapt"):
            pgbatch.fetch(conn, f"SELECT count(*) FROM {table} WHERE x = %s", (object(),))
        conn.rollback()
        conn.begin()
        assert pgbatch.fetch(conn, f"SELECT count(*) FROM {table}", ()) == [(0,)]
        pgbatch.defer(conn, (f"INSERT INTO {table} VALUES (%s)", (7,)))
        store.commit(conn)
    assert values(engine, table) == [7]


def test_a_statement_that_fails_to_prepare_is_prepared_again(engine: sa.Engine) -> None:
    missing = f"test_pgbatch_later_{uuid.uuid4().hex[:10]}"
    with engine.connect() as conn:
        conn.begin()
        with pytest.raises(sa.exc.DBAPIError, match="does not exist"):
            pgbatch.fetch(conn, f"SELECT count(*) FROM {missing}", ())
        conn.rollback()
        conn.exec_driver_sql(f"CREATE TABLE {missing} (x int)")
        conn.commit()
        try:
            conn.begin()
            assert pgbatch.fetch(conn, f"SELECT count(*) FROM {missing}", ()) == [(0,)]
            conn.rollback()
        finally:
            conn.exec_driver_sql(f"DROP TABLE {missing}")
            conn.commit()


def test_a_connection_that_must_not_prepare_is_not_made_to(pg_url: str) -> None:
    """``prepare_threshold=None`` is psycopg's switch for servers behind a pooler that forbids
    named prepared statements; pgbatch follows it (psycopg's own ``prepare=True`` does)."""
    url = sa.make_url(store.database_url(pg_url))
    for threshold, named in ((None, False), (5, True)):
        eng = pgbatch.create_engine(url, connect_args={"prepare_threshold": threshold})
        fd, path = tempfile.mkstemp()
        try:
            with eng.connect() as conn:
                pgconn(conn).trace(fd)
                conn.begin()
                assert pgbatch.fetch(conn, "SELECT %s::int + 1", (1,)) == [(2,)]
                conn.rollback()
                pgconn(conn).untrace()
            with open(path) as trace:
                assert ('Parse\t "_pg3_' in trace.read()) is named
        finally:
            os.close(fd)
            os.unlink(path)
            eng.dispose()


def test_a_dropped_connection_is_an_outage_and_a_refusal_is_not(engine: sa.Engine) -> None:
    """Errors from a pipeline reach runtime.outages as SQLAlchemy's: a server's answer (here
    SQLSTATE 22012) is not waited out, a connection the server dropped is (and is invalidated,
    so the pool replaces it)."""
    with engine.connect() as conn:
        conn.begin()
        with pytest.raises(sa.exc.DBAPIError) as refused:
            pgbatch.fetch(conn, "SELECT 1 / 0", ())
        assert outages.outage_cause(refused.value) is None
        conn.rollback()
        [(pid,)] = pgbatch.read(conn, "SELECT pg_backend_pid()", ())
        with engine.connect() as other:
            assert pgbatch.read(other, "SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]
        conn.begin()
        with pytest.raises(sa.exc.DBAPIError) as dropped:
            pgbatch.fetch(conn, "SELECT 1", ())
        assert dropped.value.connection_invalidated
        assert outages.outage_cause(dropped.value) is not None
