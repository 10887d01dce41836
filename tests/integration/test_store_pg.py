"""RecordLog on a real PostgreSQL (TWOPHASE_TEST_PG_URL); skipped when absent unless CI is set."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from runtime.errors import ConfigurationError
from runtime.store import LogRow, RecordLog, check_connection, make_engine

pytestmark = pytest.mark.integration

PG_URL = os.environ.get("TWOPHASE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
FINISHED = ("END", "ABORT")


@pytest.fixture(scope="module")
def engine() -> Iterator[sa.Engine]:
    eng = make_engine(PG_URL)
    try:
        check_connection(eng)
    except ConfigurationError as exc:
        eng.dispose()
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    yield eng
    eng.dispose()


@pytest.fixture
def log(engine: sa.Engine) -> Iterator[RecordLog]:
    name = f"test_log_{uuid.uuid4().hex[:12]}"
    record_log = RecordLog(engine, name)
    yield record_log
    record_log.table.drop(engine, checkfirst=True)


def rows(tx_id: str, *kinds: str) -> list[LogRow]:
    return [LogRow(tx_id, kind, f"{tx_id}:{kind}".encode()) for kind in kinds]


def test_engine_is_psycopg(engine: sa.Engine) -> None:
    assert engine.url.drivername == "postgresql+psycopg"
    assert engine.pool.size() == 5  # type: ignore[attr-defined]


def test_table_and_index_created(log: RecordLog, engine: sa.Engine) -> None:
    inspector = sa.inspect(engine)
    assert inspector.has_table(log.table.name)
    columns = {c["name"]: c for c in inspector.get_columns(log.table.name)}
    assert set(columns) == {"seq", "tx_id", "kind", "body", "written_at"}
    assert isinstance(columns["seq"]["type"], sa.BigInteger)
    indexed = {tuple(ix["column_names"]) for ix in inspector.get_indexes(log.table.name)}
    assert ("tx_id",) in indexed
    RecordLog(engine, log.table.name)  # idempotent


def test_append_batch_one_transaction(log: RecordLog, engine: sa.Engine) -> None:
    log.append([LogRow(f"tx-{i}", "PREPARED", bytes([i])) for i in range(100)])
    assert (log.flushes, log.rows_written) == (1, 100)
    assert log.count() == 100
    with engine.connect() as conn:  # rows written by one transaction share its xmin
        writers = f"SELECT count(DISTINCT xmin::text) FROM {log.table.name}"
        assert conn.execute(sa.text(writers)).scalar_one() == 1
    log.append([])
    assert log.flushes == 1


def test_core_api(log: RecordLog) -> None:
    log.append(rows("a", "BEGIN") + rows("b", "BEGIN") + rows("c", "BEGIN"))
    log.append(rows("a", "COMMIT") + rows("b", "ABORT"))
    log.append([*rows("a", "END"), LogRow("d", "BEGIN", b"\x00\xff binary")])

    found = log.rows_for(["a", "b", "nope"])
    assert set(found) == {"a", "b"}
    assert [r.kind for r in found["a"]] == ["BEGIN", "COMMIT", "END"]
    assert found["a"][0].body == b"a:BEGIN"
    assert isinstance(found["a"][0].body, bytes)
    assert log.rows_for(["d"])["d"][0].body == b"\x00\xff binary"

    assert list(log.unfinished(FINISHED)) == ["c", "d"]
    assert log.tx_ids() == ["d", "a", "b", "c"]
    assert log.tx_ids(limit=1, offset=1) == ["a"]

    assert log.prune_finished_before(FINISHED, before=0.0) == 0
    assert log.prune_finished_before(FINISHED, before=time.time() + 10) == 5
    assert log.count() == 2
    assert log.prune(["c", "d", "zzz"]) == 2
    assert log.count() == 0


def test_one_batch_keeps_its_order(log: RecordLog) -> None:
    kinds = [f"K{i:03d}" for i in range(300)]
    log.append([LogRow("ordered", kind, kind.encode()) for kind in kinds])
    found = log.rows_for(["ordered"])["ordered"]
    assert [r.kind for r in found] == kinds
    assert [r.body for r in found] == [k.encode() for k in kinds]


def test_large_id_list_is_chunked(log: RecordLog) -> None:
    ids = [f"tx-{i}" for i in range(1203)]
    log.append([LogRow(i, "BEGIN", b"") for i in ids])
    assert len(log.rows_for(ids)) == 1203
    assert log.prune(ids) == 1203


def test_durable_across_new_engine(log: RecordLog) -> None:
    log.append(rows("t1", "PREPARED", "COMMITTED"))
    other = make_engine(PG_URL)
    try:
        again = RecordLog(other, log.table.name)
        assert [r.kind for r in again.rows_for(["t1"])["t1"]] == ["PREPARED", "COMMITTED"]
    finally:
        other.dispose()


def test_concurrent_append(log: RecordLog) -> None:
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            for i in range(25):
                log.append(rows(f"{name}-{i}", "BEGIN", "END"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("t1", "t2", "t3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert log.count() == 150
    assert log.unfinished(FINISHED) == {}
