"""Unit tests of runtime.store on SQLite files."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from runtime.errors import ConfigurationError
from runtime.store import (
    LogRow,
    RecordLog,
    check_connection,
    database_url,
    make_engine,
    psycopg_url,
)

FINISHED = ("END", "ABORT")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "dir" / "log.db"


@pytest.fixture
def engine(db_path: Path) -> Iterator[sa.Engine]:
    eng = make_engine(str(db_path))
    yield eng
    eng.dispose()


@pytest.fixture
def log(engine: sa.Engine) -> RecordLog:
    return RecordLog(engine, "decision_log")


def rows(tx_id: str, *kinds: str) -> list[LogRow]:
    return [LogRow(tx_id, kind, f"{tx_id}:{kind}".encode()) for kind in kinds]


# --- URLs -------------------------------------------------------------------------------------


def test_bare_path_becomes_absolute_sqlite_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert database_url("data/log.db") == f"sqlite:///{tmp_path / 'data' / 'log.db'}"
    assert database_url(str(tmp_path / "x.db")) == f"sqlite:///{tmp_path / 'x.db'}"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///rel.db", "sqlite:///rel.db"),
        ("sqlite:////abs/log.db", "sqlite:////abs/log.db"),
        ("postgresql://u:pw@h:5432/db", "postgresql+psycopg://u:pw@h:5432/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ],
)
def test_url_normalisation(given: str, expected: str) -> None:
    assert database_url(given) == expected


@pytest.mark.parametrize(
    "bad", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db", "http://x", "", "postgres://"]
)
def test_unsupported_url_message(bad: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        database_url(bad)
    message = str(info.value)
    assert message == (
        f"unsupported database URL {bad!r}: "
        "use a file path, sqlite:///PATH or postgresql://USER@HOST/DB"
    )
    assert "\n" not in message


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("mysql://u@h/db", "mysql://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgres://", "postgresql+psycopg://"),  # libpq's defaults
        ("sqlite:///rel.db", "sqlite:///rel.db"),
    ],
)
def test_any_dialect_leaves_other_schemes_to_sqlalchemy(given: str, expected: str) -> None:
    assert database_url(given, any_dialect=True) == expected


def test_any_dialect_still_makes_paths_absolute_and_refuses_an_empty_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert database_url("bank.db", any_dialect=True) == f"sqlite:///{tmp_path / 'bank.db'}"
    with pytest.raises(ConfigurationError, match="unsupported database URL"):
        database_url("  ", any_dialect=True)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:pw@h:5432/db"),
        ("postgres://u@h/db", "postgresql://u@h/db"),
        ("postgresql+psycopg://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
        ("postgresql://", "postgresql://"),
        ("host=h dbname=db user=u", "host=h dbname=db user=u"),  # a libpq connection string
    ],
)
def test_psycopg_url(given: str, expected: str) -> None:
    assert psycopg_url(given) == expected


def test_make_engine_rejects_bad_url() -> None:
    with pytest.raises(ConfigurationError):
        make_engine("oracle://scott@tiger/db")


def test_unreachable_postgres_is_one_line_and_redacted() -> None:
    # Port 1 on localhost: nothing listens, the refusal is immediate.
    engine = make_engine("postgresql://alice:s3cret@127.0.0.1:1/nowhere")  # does not connect
    try:
        with pytest.raises(ConfigurationError) as info:
            check_connection(engine)
    finally:
        engine.dispose()
    message = str(info.value)
    assert message.startswith("cannot connect to database postgresql+psycopg://alice:***@")
    assert "s3cret" not in message
    assert "\n" not in message


def test_unopenable_sqlite_file_is_configuration_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigurationError, match=r"^cannot create directory .* SQLite database"):
        make_engine(str(blocker / "log.db"))
    engine = sa.create_engine(f"sqlite:///{blocker}/log.db")
    with pytest.raises(ConfigurationError, match=r"^cannot connect to database sqlite:///"):
        check_connection(engine)


# --- engine -----------------------------------------------------------------------------------


def test_engine_creates_parent_dir_and_pragmas_in_force(engine: sa.Engine, db_path: Path) -> None:
    check_connection(engine)
    assert db_path.parent.is_dir()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_pragmas_apply_to_every_pooled_connection(engine: sa.Engine) -> None:
    conns = [engine.connect() for _ in range(3)]
    try:
        values = {c.exec_driver_sql("PRAGMA synchronous").scalar() for c in conns}
    finally:
        for c in conns:
            c.close()
    assert values == {2}


# --- RecordLog ----------------------------------------------------------------------------


def test_append_batch_is_one_transaction(log: RecordLog, engine: sa.Engine) -> None:
    commits: list[object] = []
    sa.event.listen(engine, "commit", lambda conn: commits.append(conn))
    batch = [LogRow(f"tx-{i}", "PREPARED", bytes([i])) for i in range(100)]
    log.append(batch)
    assert log.flushes == 1
    assert log.rows_written == 100
    assert len(commits) == 1
    assert log.count() == 100


def test_append_empty_is_noop(log: RecordLog, engine: sa.Engine) -> None:
    begins: list[object] = []
    sa.event.listen(engine, "begin", lambda conn: begins.append(conn))
    log.append([])
    assert (log.flushes, log.rows_written, begins) == (0, 0, [])


def test_append_assigns_seq_and_written_at(log: RecordLog) -> None:
    before = time.time()
    log.append([LogRow("a", "BEGIN", b"x", seq=99, written_at=1.0)])
    [row] = log.rows_for(["a"])["a"]
    assert row.seq >= 1 and row.seq != 99
    assert before - 1 <= row.written_at <= time.time() + 1
    assert (row.tx_id, row.kind, row.body) == ("a", "BEGIN", b"x")


def test_append_rejects_oversized_fields(log: RecordLog) -> None:
    with pytest.raises(ValueError, match="tx_id"):
        log.append([LogRow("x" * 201, "BEGIN", b"")])
    with pytest.raises(ValueError, match="kind"):
        log.append([LogRow("a", "K" * 41, b"")])
    assert log.count() == 0 and log.flushes == 0


def test_rows_for_ordered_by_seq(log: RecordLog) -> None:
    log.append(rows("a", "BEGIN") + rows("b", "BEGIN"))
    log.append(rows("a", "COMMIT") + rows("b", "ABORT"))
    log.append(rows("a", "END"))
    found = log.rows_for(["a", "b", "missing", "a"])
    assert set(found) == {"a", "b"}
    assert [r.kind for r in found["a"]] == ["BEGIN", "COMMIT", "END"]
    assert [r.kind for r in found["b"]] == ["BEGIN", "ABORT"]
    assert found["a"][1].body == b"a:COMMIT"
    for lst in found.values():
        assert [r.seq for r in lst] == sorted(r.seq for r in lst)
    assert log.rows_for([]) == {}


def test_rows_for_chunks_large_id_lists(log: RecordLog) -> None:
    ids = [f"tx-{i}" for i in range(1203)]
    log.append([LogRow(i, "BEGIN", b"") for i in ids])
    found = log.rows_for(ids)
    assert len(found) == 1203
    assert log.prune(ids) == 1203
    assert log.count() == 0


def test_unfinished(log: RecordLog) -> None:
    log.append(rows("done", "BEGIN", "COMMIT", "END"))
    log.append(rows("committing", "BEGIN", "COMMIT"))
    log.append(rows("aborted", "BEGIN", "ABORT"))
    log.append(rows("voting", "BEGIN"))
    open_ = log.unfinished(FINISHED)
    assert list(open_) == ["committing", "voting"]
    assert [r.kind for r in open_["committing"]] == ["BEGIN", "COMMIT"]
    assert len(log.unfinished([])) == 4


def test_tx_ids_most_recent_first(log: RecordLog) -> None:
    log.append(rows("a", "BEGIN"))
    log.append(rows("b", "BEGIN"))
    log.append(rows("c", "BEGIN"))
    log.append(rows("a", "COMMIT"))
    assert log.tx_ids() == ["a", "c", "b"]
    assert log.tx_ids(limit=2) == ["a", "c"]
    assert log.tx_ids(limit=2, offset=2) == ["b"]


def test_prune(log: RecordLog) -> None:
    log.append(rows("a", "BEGIN", "END") + rows("b", "BEGIN"))
    assert log.prune(["a", "zzz"]) == 2
    assert log.prune([]) == 0
    assert log.count() == 1
    assert list(log.rows_for(["a", "b"])) == ["b"]


def test_prune_finished_before(log: RecordLog) -> None:
    log.append(rows("old", "BEGIN", "END") + rows("open", "BEGIN") + rows("ab", "BEGIN", "ABORT"))
    assert log.prune_finished_before(FINISHED, before=0.0) == 0
    assert log.prune_finished_before([], before=time.time() + 10) == 0
    assert log.prune_finished_before(FINISHED, before=time.time() + 10) == 4
    assert log.tx_ids() == ["open"]


def test_durable_across_new_engine(db_path: Path) -> None:
    first = make_engine(str(db_path))
    RecordLog(first, "plog").append(rows("t1", "PREPARED", "COMMITTED"))
    first.dispose()
    second = make_engine(f"sqlite:///{db_path}")
    try:
        again = RecordLog(second, "plog")  # table exists: create_all must not fail
        assert [r.kind for r in again.rows_for(["t1"])["t1"]] == ["PREPARED", "COMMITTED"]
        assert again.count() == 2
    finally:
        second.dispose()


def test_two_tables_on_one_engine(engine: sa.Engine) -> None:
    a, b = RecordLog(engine, "log_a"), RecordLog(engine, "log_b")
    a.append(rows("x", "BEGIN"))
    assert (a.count(), b.count()) == (1, 0)


def test_concurrent_append_from_two_threads(log: RecordLog) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def writer(name: str) -> None:
        try:
            barrier.wait()
            for i in range(50):
                log.append(
                    [LogRow(f"{name}-{i}", "BEGIN", b"."), LogRow(f"{name}-{i}", "END", b"")]
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert log.count() == 200
    assert log.flushes == 100 and log.rows_written == 200
    assert log.unfinished(FINISHED) == {}
    for tx, lst in log.rows_for([f"t1-{i}" for i in range(50)]).items():
        assert [r.kind for r in lst] == ["BEGIN", "END"], tx


def test_analyze_schedule_is_due_at_growing_thresholds() -> None:
    from runtime.store import AnalyzeSchedule

    schedule = AnalyzeSchedule(first=10, factor=4, last=200)
    due = [n for n in range(1, 1001) if schedule.wrote(1)]
    assert due == [10, 40, 160]
    jumpy = AnalyzeSchedule(first=10, factor=4, last=200)
    assert jumpy.wrote(100) is True  # past 10 and 40 at once: one ANALYZE, next at 160
    assert jumpy.wrote(59) is False
    assert jumpy.wrote(1) is True
