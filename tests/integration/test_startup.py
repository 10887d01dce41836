"""Starting a service (issue 12): what cannot work ends it in one line with exit status 2; what is
down is waited for, with one line when lost and one when back.

Real processes (``python -m twophase ...``) against the real PostgreSQL and RabbitMQ. Nothing here
stops a server: "down" is a closed port (127.0.0.1:1), or a local TCP relay to RabbitMQ that is
opened only after the service has started. Every process started here is ended by its PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from schemas import topology
from twophase.processes import ServiceGroup

pytestmark = pytest.mark.integration

SECRET = "s3cret-pw"
CLOSED = "127.0.0.1:1"  # nothing listens there: connections are refused at once


def with_database(pg_url: str, database: str, password: str = SECRET) -> str:
    """``pg_url`` naming ``database``, with a password (trust auth ignores it; logs must not)."""
    parts = urlsplit(pg_url)
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit((parts.scheme, netloc, "/" + database, parts.query, ""))


def with_netloc(url: str, hostport: str) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit((parts.scheme, f"{userinfo}@{hostport}", parts.path, parts.query, ""))


def env(tmp_path: Path, **variables: str) -> dict[str, str]:
    found = dict(os.environ)
    for name in list(found):
        if name.startswith("TWOPHASE_"):
            del found[name]
    # a service without a key starts only when told so
    found.update(TWOPHASE_DATA_DIR=str(tmp_path), TWOPHASE_METRICS_PORT="0", TWOPHASE_INSECURE="on")
    found.update(variables)
    return found


def run(argv: list[str], environ: dict[str, str], timeout: float = 60) -> tuple[int, list[str]]:
    """Exit status and the lines of stderr of ``python -m twophase ARGV``."""
    done = subprocess.run(
        [sys.executable, "-m", "twophase", *argv],
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]


def assert_one_line_error(status: int, lines: list[str], *words: str) -> None:
    assert status == 2, lines
    assert len(lines) == 1, lines
    assert "error:" in lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert SECRET not in lines[0]


@pytest.fixture
def missing_database(pg_server: str) -> str:
    return with_database(pg_server, f"twophase_missing_{uuid.uuid4().hex[:8]}")


# ---- what cannot work: one line, exit status 2 --------------------------------------------------


def test_coordinator_log_in_a_database_that_does_not_exist(
    tmp_path: Path, amqp_url: str, missing_database: str
) -> None:
    status, lines = run(
        ["coordinator", "--log-url", missing_database],
        env(tmp_path, TWOPHASE_AMQP_URL=amqp_url),
    )
    assert_one_line_error(status, lines, "twophase coordinator:", "does not exist", "***")


def test_native_branches_in_a_database_that_does_not_exist(
    tmp_path: Path, amqp_url: str, missing_database: str
) -> None:
    status, lines = run(
        ["participant", "--app", "twophase.bank:from_env"],
        env(
            tmp_path,
            TWOPHASE_AMQP_URL=amqp_url,
            TWOPHASE_PARTICIPANT_NAME="bank-a",
            TWOPHASE_BANK_DB=missing_database,
            TWOPHASE_BANK_RESOURCE="postgres",
        ),
    )
    assert_one_line_error(status, lines, "twophase participant:", "resource", "does not exist")


def test_participant_log_in_a_database_that_does_not_exist(
    tmp_path: Path, amqp_url: str, missing_database: str
) -> None:
    status, lines = run(
        ["participant", "--app", "twophase.bank:from_env", "--log-url", missing_database],
        env(
            tmp_path,
            TWOPHASE_AMQP_URL=amqp_url,
            TWOPHASE_PARTICIPANT_NAME="bank-a",
            TWOPHASE_BANK_DB=str(tmp_path / "bank.db"),
        ),
    )
    assert_one_line_error(status, lines, "the log at", "does not exist")


MAX_PREPARED_ZERO_APP = '''\
"""A bank on native branches whose server says max_prepared_transactions = 0 (the real test
server cannot be reconfigured: only the answer to SHOW is replaced)."""
import os

from participant import resources
from twophase import bank

_read = resources._read


def _zero(conn, query, params):
    if query.startswith("SHOW max_prepared_transactions"):
        return [("0",)]
    return _read(conn, query, params)


resources._read = _zero


def make():
    return bank.create_bank("bank-z", os.environ["ZERO_DB"], resource="postgres")
'''


def test_max_prepared_transactions_zero(tmp_path: Path, amqp_url: str, pg_url: str) -> None:
    (tmp_path / "zero_app.py").write_text(MAX_PREPARED_ZERO_APP)
    status, lines = run(
        ["participant", "--app", "zero_app:make"],
        env(
            tmp_path,
            TWOPHASE_AMQP_URL=amqp_url,
            PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
            ZERO_DB=pg_url,
        ),
    )
    assert_one_line_error(status, lines, "max_prepared_transactions = 0")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["participant", "--app", "no_such_module:bank"], "cannot import"),
        (["participant", "--app", "twophase.bank"], "must look like"),
        (["participant", "--app", "twophase.bank:no_such_bank"], "no attribute"),
        (["coordinator", "--log-url", "mysql://u:s3cret-pw@h/db"], "unsupported database URL"),
        (["coordinator", "--amqp-url", "http://u:s3cret-pw@localhost/"], "not an AMQP URL"),
    ],
)
def test_bad_settings(tmp_path: Path, argv: list[str], words: str) -> None:
    status, lines = run(argv, env(tmp_path, TWOPHASE_AMQP_URL=f"amqp://guest:guest@{CLOSED}/"))
    assert status == 2, lines
    assert len(lines) == 1 and words in lines[0], lines
    assert SECRET not in lines[0]


@pytest.mark.parametrize(
    "argv", [["coordinator"], ["participant", "--app", "twophase.bank:from_env"]]
)
def test_a_service_without_a_key_needs_insecure(tmp_path: Path, argv: list[str]) -> None:
    keyless = env(
        tmp_path,
        TWOPHASE_AMQP_URL=f"amqp://guest:guest@{CLOSED}/",
        TWOPHASE_INSECURE="off",
        TWOPHASE_PARTICIPANT_NAME="bank-a",
        TWOPHASE_BANK_DB=str(tmp_path / "bank-a.db"),
    )
    status, lines = run(argv, keyless)
    assert_one_line_error(status, lines, "no key", "TWOPHASE_KEY_FILE", "--insecure")


def test_a_bad_native_branch_url(tmp_path: Path, amqp_url: str, pg_server: str) -> None:
    bad = with_netloc(pg_server, "127.0.0.1:notaport")
    status, lines = run(
        ["participant", "--app", "twophase.bank:from_env"],
        env(
            tmp_path,
            TWOPHASE_AMQP_URL=amqp_url,
            TWOPHASE_PARTICIPANT_NAME="bank-a",
            TWOPHASE_BANK_DB=bad,
            TWOPHASE_BANK_RESOURCE="postgres",
        ),
    )
    assert_one_line_error(status, lines, "notaport")


def test_a_refused_broker_login(tmp_path: Path, amqp_url: str) -> None:
    parts = urlsplit(amqp_url)
    wrong = urlunsplit(
        (parts.scheme, f"guest:{SECRET}@{parts.hostname}:{parts.port}", parts.path, "", "")
    )
    status, lines = run(["coordinator"], env(tmp_path, TWOPHASE_AMQP_URL=wrong))
    assert_one_line_error(status, lines, "ACCESS_REFUSED", "guest:***@")


# ---- what is down: waited for ------------------------------------------------------------------


@contextmanager
def started(
    argv: list[str], environ: dict[str, str], out: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with out.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "twophase", *argv],
            env=environ,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)


def lines_of(out: Path) -> list[str]:
    return [line for line in out.read_text(errors="replace").splitlines() if line.strip()]


def wait_for_line(out: Path, words: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(words in line for line in lines_of(out)):
        assert time.monotonic() < deadline, f"no line with {words!r}: {lines_of(out)}"
        time.sleep(0.1)


def test_coordinator_waits_for_a_broker_that_is_down(tmp_path: Path) -> None:
    out = tmp_path / "coordinator.out"
    broker = f"amqp://guest:{SECRET}@{CLOSED}/"
    with started(["coordinator"], env(tmp_path, TWOPHASE_AMQP_URL=broker), out) as process:
        wait_for_line(out, "lost rabbitmq")
        time.sleep(3)
        assert process.poll() is None, lines_of(out)
    lost = [line for line in lines_of(out) if "lost" in line]
    assert len(lost) == 1, lines_of(out)
    assert "waiting for it with back-off" in lost[0] and "guest:***@127.0.0.1:1" in lost[0]
    assert "connection refused" in lost[0]
    assert not any(SECRET in line for line in lines_of(out))


def test_participant_waits_for_its_database_that_is_down(
    tmp_path: Path, amqp_url: str, pg_server: str
) -> None:
    out = tmp_path / "bank-a.out"
    environ = env(
        tmp_path,
        TWOPHASE_AMQP_URL=amqp_url,
        TWOPHASE_PARTICIPANT_NAME="bank-a",
        TWOPHASE_BANK_DB=with_netloc(with_database(pg_server, "test"), CLOSED),
        TWOPHASE_BANK_RESOURCE="postgres",
    )
    argv = ["participant", "--app", "twophase.bank:from_env"]
    with started(argv, environ, out) as process:
        wait_for_line(out, "lost resource")
        time.sleep(3)
        assert process.poll() is None, lines_of(out)
    lost = [line for line in lines_of(out) if "lost" in line]
    assert len(lost) == 1, lines_of(out)
    assert "bank-a: lost resource at postgresql://postgres:***@127.0.0.1:1/" in lost[0]
    assert not any(SECRET in line for line in lines_of(out))


class Relay:
    """A TCP relay from a local port to ``target``, listening only once ``open()`` is called:
    until then connections to the port are refused, as by a broker that is down."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    def open(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        with suppress(OSError):
            while True:
                client, _ = server.accept()
                upstream = socket.create_connection(self.target)
                self._sockets += [client, upstream]
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for sock in self._sockets:
            with suppress(OSError):
                sock.close()


def test_coordinator_starts_once_the_broker_answers(tmp_path: Path, amqp_url: str) -> None:
    parts = urlsplit(amqp_url)
    relay = Relay((parts.hostname or "127.0.0.1", parts.port or 5672))
    relayed = with_netloc(amqp_url, f"127.0.0.1:{relay.port}")
    out = tmp_path / "coordinator.out"
    try:
        with started(["coordinator"], env(tmp_path, TWOPHASE_AMQP_URL=relayed), out) as process:
            wait_for_line(out, "lost rabbitmq")
            time.sleep(1)
            relay.open()
            wait_for_line(out, "is back after")
            ServiceGroup(amqp_url, tmp_path).wait_ready([topology.COORDINATOR_QUEUE], 30)
            assert process.poll() is None
    finally:
        relay.close()
    lines = lines_of(out)
    assert len([line for line in lines if "lost rabbitmq" in line]) == 1, lines
    assert len([line for line in lines if "is back after" in line]) == 1, lines
