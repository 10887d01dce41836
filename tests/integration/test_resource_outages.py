"""What a handler's failure is, on the real PostgreSQL: a connection that breaks or cannot be made
is an outage (``ResourceUnavailable``, the batch is redone later), a statement the server refused
is a NO vote. The server is never stopped: a backend is terminated, or the URL points at a closed
port."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from participant.operations import OperationSpec, Refuse
from participant.reservation import ReservationResource
from participant.resources import PostgresResource
from runtime import outages
from runtime.errors import ResourceUnavailable

pytestmark = pytest.mark.integration


def terminate_own_backend(conn: Any, args: dict[str, Any]) -> None:
    """What a server restart does to a handler's statement, with only this session hurt."""
    conn.execute("INSERT INTO touched VALUES (%s)", (args["n"],))
    if args.get("die"):
        conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")


@pytest.fixture
def native(pg_url: str) -> Any:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE touched (n text PRIMARY KEY)")
    resource = PostgresResource(pg_url, lock_timeout=0.2)
    resource.bind("bank-a")
    yield resource
    resource.close()


def touched(pg_url: str) -> list[str]:
    with psycopg.connect(pg_url) as conn:
        return [n for (n,) in conn.execute("SELECT n FROM touched ORDER BY n").fetchall()]


@pytest.mark.parametrize("one_phase", [False, True])
def test_a_handler_whose_connection_dies_raises_an_outage_then_runs_again(
    native: PostgresResource, pg_url: str, one_phase: bool
) -> None:
    op = OperationSpec("touch", terminate_own_backend)
    run = native.commit_at_once if one_phase else native.prepare
    with pytest.raises(ResourceUnavailable) as info:
        run("tx-1", op, {"n": "1", "die": True})
    assert outages.is_outage(info.value)
    assert native.prepared() == set() and native.committed(["tx-1"]) == set()
    run("tx-1", op, {"n": "1"})  # the redelivered PREPARE, once the database answers
    if one_phase:
        assert native.committed(["tx-1"]) == {"tx-1"}
    else:
        assert native.prepared() == {"tx-1"}
        native.commit("tx-1", op, {})
    assert touched(pg_url) == ["1"]


def test_a_lock_timeout_is_still_a_no_vote(native: PostgresResource, pg_url: str) -> None:
    def take_row(conn: Any, args: dict[str, Any]) -> None:
        conn.execute("UPDATE touched SET n = n WHERE n = 'held'")

    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("INSERT INTO touched VALUES ('held')")
    with psycopg.connect(pg_url) as holder:
        holder.execute("SELECT * FROM touched WHERE n = 'held' FOR UPDATE")
        with pytest.raises(Refuse, match="LockNotAvailable"):
            native.prepare("tx-2", OperationSpec("take", take_row), {})
    assert native.prepared() == set()


def test_a_database_that_does_not_answer_is_an_outage_not_a_no(
    native: PostgresResource, pg_url: str
) -> None:
    native._url = "postgresql://postgres:s3cret@127.0.0.1:1/gone"
    native._drop_idle()
    op = OperationSpec("touch", terminate_own_backend)
    for run in (native.prepare, native.commit_at_once):
        with pytest.raises(ResourceUnavailable) as info:
            run("tx-3", op, {"n": "3"})
        assert "127.0.0.1:1" in str(info.value) and "s3cret" not in str(info.value)


def test_reservation_on_postgres_raises_an_outage_for_a_dead_connection(
    pg_url: str, tmp_path: Path
) -> None:
    resource = ReservationResource(pg_url)
    resource.bind("bank-b")
    runs: list[str] = []

    def handler(db: sa.Connection, args: dict[str, Any]) -> None:
        runs.append(args["n"])
        if args.get("die"):
            db.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")

    op = OperationSpec("touch", handler)
    try:
        with pytest.raises(ResourceUnavailable):
            resource.prepare_many([("tx-4", op, {"n": "4", "die": True})])
        assert resource.prepared() == set()
        assert resource.prepare_many([("tx-4", op, {"n": "4"})]) == [None]
        assert resource.prepared() == {"tx-4"}
    finally:
        resource.close()
    assert runs == ["4", "4"]
