"""Shared fixtures: real RabbitMQ and PostgreSQL, isolated per test.

Each test that needs the broker gets a virtual host of its own (created and deleted with
``rabbitmqctl``), so the fixed queue names of the topology never collide between tests, nor with a
demo running on the same broker. A missing server skips the test locally and fails it in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest

AMQP_URL = os.environ.get("TWOPHASE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL = os.environ.get("TWOPHASE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = bool(os.environ.get("CI"))

# A service starts without a key only when told so (runtime.config.auth). Most tests run services
# without authentication, in this process and in the processes they start (which inherit the
# variable); the tests of authentication give keys, and those of the refusal remove the variable.
os.environ.setdefault("TWOPHASE_INSECURE", "on")


def _unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} is not available")


def _broker_up() -> bool:
    from runtime.amqp import AmqpChannel
    from runtime.errors import BrokerUnavailable

    try:
        AmqpChannel(AMQP_URL, connection_name="twophase-test-probe").close()
    except BrokerUnavailable:
        return False
    return True


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


@pytest.fixture(scope="session")
def broker() -> str:
    if not _broker_up():
        _unavailable(f"RabbitMQ at {AMQP_URL}")
    if shutil.which("rabbitmqctl") is None:
        _unavailable("rabbitmqctl")
    return AMQP_URL


@pytest.fixture
def amqp_url(broker: str) -> Iterator[str]:
    """A fresh virtual host on the test broker, deleted afterwards."""
    vhost = f"twophase-test-{uuid.uuid4().hex[:10]}"
    user = urlsplit(broker).username or "guest"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    parts = urlsplit(broker)
    yield urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), "", ""))
    subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def pg_server() -> str:
    try:
        with psycopg.connect(PG_URL, connect_timeout=5) as conn:
            setting = conn.execute("SHOW max_prepared_transactions").fetchone()
    except psycopg.OperationalError:
        _unavailable(f"PostgreSQL at {PG_URL}")
    if setting is None or int(setting[0]) == 0:
        _unavailable("PostgreSQL with max_prepared_transactions > 0")
    return PG_URL


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards (prepared branches included)."""
    name = f"twophase_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(pg_server)
    yield urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))
    with psycopg.connect(pg_server, autocommit=True) as conn:
        leftovers = conn.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = %s", (name,)
        ).fetchall()
        for (gid,) in leftovers:
            with psycopg.connect(
                urlunsplit((parts.scheme, parts.netloc, "/" + name, "", "")), autocommit=True
            ) as other:
                other.execute(f"ROLLBACK PREPARED '{gid}'")
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def forbid_fallback(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], None]:
    """Make a ReservationResource fail the test if a batch falls back to branch-by-branch.

    That fallback is for refusals and failures; on a healthy batch it would hide a broken batch
    statement behind correct results (it once did)."""

    def forbid(resource: Any) -> None:
        def no_fallback(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("fell back to branch-by-branch")

        real_batch = resource._prepare_batch

        def optimistic_only(*args: Any, isolate: bool) -> Any:
            assert not isolate, "fell back to a savepoint per branch"
            return real_batch(*args, isolate=isolate)

        monkeypatch.setattr(resource, "_finish_each", no_fallback)
        monkeypatch.setattr(resource, "_prepare_batch", optimistic_only)

    return forbid
