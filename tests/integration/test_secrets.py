"""Secrets stay secret: the real ``twophase demo`` with every output on prints no password or key.

The demo (its coordinator and three banks as processes of their own) runs with a RabbitMQ user
made for this test, the logs of every service in PostgreSQL through a URL carrying a password
(trust auth ignores it; nothing may print it), both passwords holding a ``/`` and a ``+`` as
``base64`` makes them, DEBUG logs (``-v`` and ``TWOPHASE_VERBOSE=on``, which the services
inherit), metrics on one port per service (scraped over HTTP during the run) and tracing to a tiny
OTLP/HTTP receiver here that keeps the raw bodies. Then the demo's stdout and stderr, every
service's ``*.out``, every scrape, every span body and the dead-letter queue are searched for both
passwords (as written and percent-encoded) and for every secret key the demo made (base64 as in
the key file, url-safe, hex and raw). None may appear; the redacted URLs (``***``), DEBUG lines,
metrics and spans must, so that the test cannot pass by capturing nothing. The same demo told a
wrong password, an AMQP URL pika cannot read, or a log database that does not exist ends with
its reason, naming the user and ``***`` where the password was.

Every process started here is ended by its PID (the demo's services are in its session, which
this test creates, and are ended with it only if the demo does not end them itself).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika
import pytest

from runtime import tracing
from schemas import topology
from tests.conftest import rabbitmqctl
from tests.otlp import OtlpReceiver

pytestmark = pytest.mark.integration

SERVICES = ("coordinator", "bank-a", "bank-b", "bank-c")
TRANSFERS = 40  # at two in flight, a few seconds: time for the scrapes


class Scraper:
    """Scrapes ``/metrics`` of every service every tenth of a second (a thread per service),
    keeping every text."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.texts: dict[str, list[bytes]] = {name: [] for name in ports}
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(name, port), daemon=True)
            for name, port in ports.items()
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, name: str, port: int) -> None:
        while not self.stop.wait(0.1):
            with suppress(OSError):  # not serving yet, or stopped already
                url = f"http://127.0.0.1:{port}/metrics"
                with urllib.request.urlopen(url, timeout=2) as response:
                    self.texts[name].append(response.read())

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive ports free on every interface (the demo's services
    serve metrics on a base port and the ones after it)."""
    for _ in range(200):
        with closing(socket.socket()) as probe:
            probe.bind(("", 0))
            base: int = probe.getsockname()[1]
        if base + count > 65536:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("", port))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return base
    raise AssertionError(f"no {count} consecutive free ports")


@pytest.fixture
def sink() -> Iterator[OtlpReceiver]:
    found = OtlpReceiver()
    yield found
    found.close()


@pytest.fixture
def secret_user(amqp_url: str) -> Iterator[tuple[str, str, str]]:
    """A RabbitMQ user with a distinctive password and every permission on the test's vhost:
    (name, password, its URL of that vhost); deleted afterwards, whatever happened."""
    name = f"twophase-secret-{secrets.token_hex(4)}"
    password = base64_like("rmq")
    vhost = unquote(urlsplit(amqp_url).path[1:])
    rabbitmqctl("add_user", name, password)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")
        parts = urlsplit(amqp_url)
        netloc = f"{name}:{quote(password, safe='')}@{parts.hostname}:{parts.port or 5672}"
        yield name, password, urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    finally:
        subprocess.run(["rabbitmqctl", "delete_user", name], capture_output=True, timeout=60)


def base64_like(prefix: str) -> str:
    """A distinctive password with the ``/`` and ``+`` of one made by ``base64``: a ``/`` ends
    a URL's host part for ``urlsplit`` (it once hid such passwords from the redaction)."""
    return f"{prefix}-{secrets.token_hex(6)}/{secrets.token_hex(6)}+{secrets.token_hex(3)}="


def forms(password: str) -> list[bytes]:
    """The password as written and percent-encoded: neither may be printed."""
    return [password.encode(), quote(password, safe="").encode()]


def with_password(pg_url: str, password: str) -> str:
    """``pg_url`` with a password in it (trust auth ignores it; nothing may print it)."""
    parts = urlsplit(pg_url)
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def demo_env(**variables: str) -> dict[str, str]:
    found = {k: v for k, v in os.environ.items() if not k.startswith(("TWOPHASE_", "OTEL_"))}
    found.update(variables)
    return found


def run_demo(argv: list[str], env: dict[str, str], out: Path, err: Path, timeout: float) -> int:
    """``python -m twophase ARGV`` in a session of its own; on a timeout it is interrupted (it
    then stops its services), and its session, which holds only what it started, killed."""
    with out.open("wb") as stdout, err.open("wb") as stderr:
        demo = subprocess.Popen(
            [sys.executable, "-m", "twophase", *argv],
            env=env,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        return demo.wait(timeout)
    except subprocess.TimeoutExpired:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(20)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        raise AssertionError(f"the demo did not end in {timeout:.0f} s") from None
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def dead_letters(amqp_url: str) -> list[bytes]:
    """Every message in the dead-letter queue, body and headers, as bytes (the queue is emptied)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        found: list[bytes] = []
        try:
            channel.queue_declare(topology.DEAD_LETTER_QUEUE, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return found  # never declared: nothing was dead-lettered
        while True:
            method, props, body = channel.basic_get(topology.DEAD_LETTER_QUEUE, auto_ack=True)
            if method is None:
                return found
            found.append(body + repr(props.headers).encode())
    finally:
        connection.close()


def secret_keys(keys_dir: Path) -> dict[str, bytes]:
    """What must never be printed of each secret key file: its base64 text and its raw bytes."""
    found: dict[str, bytes] = {}
    files = sorted(keys_dir.glob("*.key"))
    assert len(files) == 1 + 3 + 1, files  # the coordinator, the banks, the demo's client
    for path in files:
        text = json.loads(path.read_text())["secret_key"]
        raw = base64.b64decode(text, validate=True)
        assert len(raw) == 32
        found[f"{path.name} (base64)"] = text.encode()
        found[f"{path.name} (url-safe base64)"] = base64.urlsafe_b64encode(raw).rstrip(b"=")
        found[f"{path.name} (hex)"] = raw.hex().encode()
        found[f"{path.name} (raw)"] = raw
    return found


def test_the_demo_prints_no_secret(
    tmp_path: Path,
    amqp_url: str,
    pg_url: str,
    secret_user: tuple[str, str, str],
    sink: OtlpReceiver,
) -> None:
    _, rabbit_password, rabbit_url = secret_user
    pg_password = base64_like("pg")  # unencoded: SQLAlchemy reads it up to the "@"
    log_url = with_password(pg_url, pg_password)
    data_dir = tmp_path / "data"
    base = free_port_run(len(SERVICES))
    ports = {name: base + i for i, name in enumerate(SERVICES)}
    env = demo_env(
        TWOPHASE_LOG_URL=log_url,  # every service's log, in PostgreSQL
        TWOPHASE_VERBOSE="on",
        TWOPHASE_METRICS_PORT=str(base),
        TWOPHASE_HEARTBEAT_INTERVAL="0.2",
        OTEL_EXPORTER_OTLP_ENDPOINT=sink.url,
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    argv = ["-v", "demo", "--amqp-url", rabbit_url, "--data-dir", str(data_dir)]
    argv += ["--transfers", str(TRANSFERS), "--concurrency", "2", "--seed", "7", "--json"]
    out, err = tmp_path / "demo.stdout", tmp_path / "demo.stderr"

    scraper = Scraper(ports)
    try:
        status = run_demo(argv, env, out, err, timeout=90)
    finally:
        scraper.close()
    assert status == 0, err.read_text(errors="replace")[-3000:]
    report = json.loads(out.read_text().strip().splitlines()[-1])
    assert report["committed"] + report["aborted"] == TRANSFERS and report["balanced"], report

    outputs: dict[str, bytes] = {"demo stdout": out.read_bytes(), "demo stderr": err.read_bytes()}
    service_logs = sorted(data_dir.rglob("*.out"))
    assert {p.stem for p in service_logs} == set(SERVICES), service_logs
    for path in service_logs:
        outputs[f"log {path.name}"] = path.read_bytes()
    for name, texts in scraper.texts.items():
        assert texts, f"no scrape of {name}'s /metrics on port {ports[name]}"
        for i, text in enumerate(texts):
            outputs[f"metrics of {name} #{i}"] = text
    bodies = sink.raw()
    for i, body in enumerate(bodies):
        outputs[f"span export #{i}"] = body
    for i, letter in enumerate(dead_letters(amqp_url)):
        outputs[f"dead letter #{i}"] = letter

    hidden = {f"RabbitMQ password {form!r}": form for form in forms(rabbit_password)}
    hidden.update({f"PostgreSQL password {form!r}": form for form in forms(pg_password)})
    hidden.update(secret_keys(data_dir / "keys"))
    leaks = [
        f"{what} in {where}"
        for where, text in outputs.items()
        for what, secret in hidden.items()
        if secret in text
    ]
    assert not leaks, leaks

    # and the outputs were there to search: logs at DEBUG, redacted URLs, metrics and spans
    everything = b"\n".join(outputs.values())
    for path in service_logs:
        assert outputs[f"log {path.name}"].strip(), f"{path.name} is empty"
    assert b"level=DEBUG" in everything, "no DEBUG line anywhere: was TWOPHASE_VERBOSE taken?"
    assert b"postgres:***@" in everything, "no redacted PostgreSQL URL: the logs say too little"
    for name in SERVICES:
        assert any(b"twophase_" in text for text in scraper.texts[name]), name
    spans = [span for body in bodies for span in tracing.spans_from_otlp(body)]
    # the services are stopped once the client has its answers: some spans may end unexported
    assert {"submit", "tx", "prepare"} <= {span.name for span in spans}, spans
    assert len({span.service for span in spans}) == len(SERVICES) + 1, {s.service for s in spans}


def with_user(amqp_url: str, user: str, password: str) -> str:
    parts = urlsplit(amqp_url)
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@pytest.mark.parametrize("case", ["refused login", "unreadable AMQP URL", "missing database"])
def test_errors_name_the_user_and_hide_the_password(
    tmp_path: Path, pg_server: str, secret_user: tuple[str, str, str], case: str
) -> None:
    """URLs in errors: the demo told a wrong password for the test's user (percent-encoded, or
    unencoded so that pika cannot read the URL), or whose services' logs are in a database that
    does not exist, ends with its reason, naming the user and ``***`` where a password was."""
    user, _, rabbit_url = secret_user
    wrong = base64_like("wrong")
    env = demo_env(TWOPHASE_VERBOSE="on", TWOPHASE_METRICS_PORT="0")
    shown = f"{user}:***@"
    if case == "refused login":
        rabbit_url = with_user(rabbit_url, user, quote(wrong, safe=""))
    elif case == "unreadable AMQP URL":
        rabbit_url = with_user(rabbit_url, user, wrong)
    else:
        missing = f"twophase_missing_{secrets.token_hex(4)}"
        env["TWOPHASE_LOG_URL"] = with_password(
            urlunsplit(urlsplit(pg_server)._replace(path="/" + missing)), wrong
        )
        shown = "postgres:***@"
    out, err = tmp_path / "demo.stdout", tmp_path / "demo.stderr"
    data_dir = tmp_path / "data"
    argv = ["-v", "demo", "--amqp-url", rabbit_url, "--data-dir", str(data_dir)]
    argv += ["--transfers", "1", "--json"]
    status = run_demo(argv, env, out, err, timeout=60)
    printed = out.read_bytes() + err.read_bytes()
    printed += b"".join(path.read_bytes() for path in sorted(data_dir.rglob("*.out")))
    assert status != 0, printed.decode(errors="replace")
    assert shown.encode() in printed, printed.decode(errors="replace")
    leaked = [form for form in forms(wrong) if form in printed]
    assert not leaked, printed.decode(errors="replace")
