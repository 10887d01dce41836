"""TLS against the real servers, with a CA and certificates made by the test (issue 14).

RabbitMQ: a TLS listener on 127.0.0.1:5671 is started in the running broker (``rabbitmqctl eval``,
no restart: other tests share the broker) and stopped at the end. PostgreSQL: ``ssl = on`` with a
generated certificate through ``ALTER SYSTEM`` and a reload (no restart), and the settings as they
were afterwards. Both are undone even when a test fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import psycopg
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization

from participant.reservation import ReservationResource
from participant.resources import PostgresResource
from runtime import outages, tls
from runtime.amqp import AmqpChannel, Delivery
from runtime.errors import BrokerUnavailable, ConfigurationError
from runtime.store import LogRow, RecordLog, check_connection, make_engine
from tests.conftest import rabbitmqctl
from tests.tlscerts import Authority

pytestmark = pytest.mark.integration

TLS_PORT = 5671
_LISTENER = f'{{"127.0.0.1", {TLS_PORT}}}'  # loopback only: the certificate names nothing else


class Pki:
    """Two unrelated CAs: ``ca`` signs the servers' and the client's certificates; a client that
    trusts only ``other`` must refuse the servers, and a server must refuse ``other``'s client."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = Authority(directory, "ca")
        self.other = Authority(directory, "other")
        self.rabbit = self.ca.issue("rabbit", server=True)
        self.postgres = self.ca.issue("postgres", server=True)
        self.client = self.ca.issue("client", server=False)
        self.stranger = self.other.issue("stranger", server=False)


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    # /tmp rather than pytest's tmp_path: the brokers' own users (rabbitmq, postgres) must be able
    # to reach the files, and pytest's directories are private to root
    directory = Path(tempfile.mkdtemp(prefix="twophase-tls-"))
    try:
        directory.chmod(0o755)
        made = Pki(directory)
        for path in directory.iterdir():
            path.chmod(0o644)  # throwaway keys: RabbitMQ runs as another user and must read them
        yield made
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _erlang(path: Path) -> str:
    return json.dumps(str(path))  # a double-quoted string, as Erlang writes one


@pytest.fixture(scope="module")
def rabbit_tls(broker: str, pki: Pki) -> Iterator[int]:
    """A TLS listener on 127.0.0.1:5671, added to the running broker, removed afterwards."""
    options = (
        f"[{{cacertfile, {_erlang(pki.ca.cert)}}}, {{certfile, {_erlang(pki.rabbit.cert)}}},"
        f" {{keyfile, {_erlang(pki.rabbit.key)}}}, {{verify, verify_peer}},"
        " {fail_if_no_peer_cert, false}]"
    )
    started = rabbitmqctl(
        "eval", f"rabbit_networking:start_ssl_listener({_LISTENER}, {options}, 1)."
    ).strip()
    try:
        # another listener on the port (a broker configured for TLS) would be tested instead
        assert started == "ok", f"cannot start a TLS listener on {TLS_PORT}: {started}"
        yield TLS_PORT
    finally:
        rabbitmqctl("eval", f"rabbit_networking:stop_tcp_listener({_LISTENER}).")


def amqps(amqp_url: str, **query: Path) -> str:
    """``amqp_url`` (a test vhost) through the TLS listener, with ``query`` appended."""
    parts = urlsplit(amqp_url)
    netloc = f"{parts.netloc.rpartition('@')[0]}@127.0.0.1:{TLS_PORT}"
    text = urlencode({key: str(value) for key, value in query.items()})
    return urlunsplit(("amqps", netloc, parts.path, text, ""))


def tls_connection(name: str) -> dict[str, object]:
    """The broker's view of the connection named ``name``."""
    command = [
        "rabbitmqctl",
        "list_connections",
        "client_properties",
        "ssl",
        "ssl_protocol",
        "peer_cert_subject",
        "--formatter",
        "json",
        "--silent",
    ]
    for _attempt in range(3):
        # the listing fails now and then when another test's connection closes during it
        listed = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if listed.returncode == 0:
            break
        time.sleep(0.5)
    assert listed.returncode == 0, f"rabbitmqctl list_connections: {listed.stderr.strip()}"
    # client_properties come as [key, type, value] triples
    found = [
        c
        for c in json.loads(listed.stdout)
        if ["connection_name", "longstr", name] in c["client_properties"]
    ]
    assert len(found) == 1, found
    connection: dict[str, object] = found[0]
    return connection


def _poll(chan: AmqpChannel, count: int) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        got += chan.poll(timeout=0.5)
    return got


def test_amqps_verifies_the_broker_and_carries_messages(
    rabbit_tls: int, amqp_url: str, pki: Pki
) -> None:
    name = f"test-tls-{uuid.uuid4().hex}"
    chan = AmqpChannel(amqps(amqp_url, cacertfile=pki.ca.cert), connection_name=name)
    try:
        queue = f"test.tls.{uuid.uuid4().hex}"
        chan.declare_queue(queue)
        for i in range(50):
            chan.publish(queue, f"m{i}".encode())
        chan.wait_for_confirms(timeout=10)
        chan.consume(queue)
        got = _poll(chan, 50)
        assert sorted(d.body for d in got) == sorted(f"m{i}".encode() for i in range(50))
        chan.ack(got)
        chan.wait_for_confirms()
        seen = tls_connection(name)
        assert seen["ssl"] is True and str(seen["ssl_protocol"]).startswith("tlsv1.")
        assert seen["peer_cert_subject"] in ("", None)  # no client certificate configured
    finally:
        chan.close()


def test_client_certificate_from_the_environment_is_presented(
    rabbit_tls: int, amqp_url: str, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tls.CA_VARIABLE, str(pki.ca.cert))
    monkeypatch.setenv(tls.CERT_VARIABLE, str(pki.client.cert))
    monkeypatch.setenv(tls.KEY_VARIABLE, str(pki.client.key))
    name = f"test-tls-{uuid.uuid4().hex}"
    chan = AmqpChannel(amqps(amqp_url), connection_name=name)
    try:
        assert chan.queue_counts(f"test.tls.missing.{uuid.uuid4().hex}") is None
        assert tls_connection(name)["peer_cert_subject"] == "CN=client"
    finally:
        chan.close()


def test_a_broker_signed_by_another_ca_is_refused_at_once(
    rabbit_tls: int, amqp_url: str, pki: Pki
) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigurationError) as refused:
        AmqpChannel(amqps(amqp_url, cacertfile=pki.other.cert), connect_attempts=10)
    # not retried: ten attempts with backoff would take seconds
    assert time.monotonic() - started < 5
    message = str(refused.value)
    assert "not trusted" in message and "certificate verify failed" not in message
    assert "\n" not in message and ":guest@" not in message  # one line, password redacted
    assert not outages.is_outage(refused.value)  # so a service ends at start, does not wait


def test_the_broker_refuses_a_client_certificate_of_another_ca(
    rabbit_tls: int, amqp_url: str, pki: Pki
) -> None:
    url = amqps(
        amqp_url, cacertfile=pki.ca.cert, certfile=pki.stranger.cert, keyfile=pki.stranger.key
    )
    with pytest.raises(BrokerUnavailable, match="cannot reach RabbitMQ"):
        AmqpChannel(url, connect_attempts=1)


def test_unusable_tls_settings_are_one_line_configuration_errors(pki: Pki) -> None:
    missing = pki.directory / "missing.pem"
    locked = pki.directory / "locked.key"
    key = serialization.load_pem_private_key(pki.client.key.read_bytes(), None)
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    cases = {
        f"amqps://u:p@127.0.0.1/?cacertfile={missing}": "cannot use AMQP CA file",
        f"amqps://u:p@127.0.0.1/?cacertfile={pki.ca.cert}&keyfile={pki.client.key}": (
            "without a certificate"
        ),
        f"amqps://u:p@127.0.0.1/?certfile={pki.client.cert}&keyfile={pki.stranger.key}": (
            "cannot use AMQP client certificate"
        ),
        f"amqp://u:p@127.0.0.1/?cacertfile={pki.ca.cert}": "use amqps://",
        # an encrypted key must not make OpenSSL prompt on the terminal (a service would hang)
        f"amqps://u:p@127.0.0.1/?certfile={pki.client.cert}&keyfile={locked}": "is encrypted",
    }
    for url, expected in cases.items():
        with pytest.raises(ConfigurationError, match=expected) as error:
            tls.amqp_parameters(url)
        assert "\n" not in str(error.value)


def test_our_query_keys_are_taken_out_before_pika_reads_the_url(pki: Pki) -> None:
    url = f"amqps://u:p@localhost:5671/v?heartbeat=7&cacertfile={pki.ca.cert}"
    params = tls.amqp_parameters(url)
    assert (params.host, params.port, params.virtual_host, params.heartbeat) == (
        "localhost",
        5671,
        "v",
        7,
    )
    assert params.ssl_options is not None and params.ssl_options.server_hostname == "localhost"
    assert tls.amqp_parameters("amqp://u:p@localhost/").ssl_options is None


# ---- PostgreSQL --------------------------------------------------------------------------------

_PG_SETTINGS = ("ssl", "ssl_cert_file", "ssl_key_file")


def _admin(pg_server: str, *statements: str) -> None:
    with psycopg.connect(pg_server, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())  # our own literals: no parameters


@pytest.fixture(scope="module")
def pg_tls(pg_server: str, pki: Pki) -> Iterator[None]:
    """``ssl = on`` with the test CA's certificate, by ALTER SYSTEM and a reload."""
    with psycopg.connect(pg_server, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT name, setting, sourcefile FROM pg_settings WHERE name = ANY(%s)",
            (list(_PG_SETTINGS),),
        ).fetchall()
    # what ALTER SYSTEM had set before is set again; what it had not is reset
    before = {name: setting for name, setting, source in rows if str(source).endswith(".auto.conf")}
    key = pki.postgres.key
    shutil.chown(key, "postgres")
    key.chmod(0o600)  # PostgreSQL refuses a key file others can read
    try:
        _admin(
            pg_server,
            f"ALTER SYSTEM SET ssl_cert_file = '{pki.postgres.cert}'",
            f"ALTER SYSTEM SET ssl_key_file = '{key}'",
            "ALTER SYSTEM SET ssl = on",
            "SELECT pg_reload_conf()",
        )
        deadline = time.monotonic() + 10
        while True:  # the postmaster reloads asynchronously
            with psycopg.connect(pg_server) as conn:
                state = conn.execute("SHOW ssl").fetchone()
            if state is not None and state[0] == "on":
                break
            assert time.monotonic() < deadline, "PostgreSQL did not turn ssl on (see its log)"
            time.sleep(0.1)
        yield
    finally:
        _admin(
            pg_server,
            *(
                f"ALTER SYSTEM SET {name} = '{before[name]}'"
                if name in before
                else f"ALTER SYSTEM RESET {name}"
                for name in _PG_SETTINGS
            ),
            "SELECT pg_reload_conf()",
        )


def with_query(url: str, **query: str | Path) -> str:
    parts = urlsplit(url)
    extra = urlencode({key: str(value) for key, value in query.items()})
    return urlunsplit(parts._replace(query="&".join(filter(None, [parts.query, extra]))))


def ssl_of_connections(pg_server: str, database: str) -> list[bool]:
    """Whether each connection to ``database`` (none of them the one asking) is encrypted."""
    with psycopg.connect(pg_server) as conn:
        rows = conn.execute(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
            " WHERE a.datname = %s AND a.pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return [bool(ssl) for (ssl,) in rows]


def test_log_and_resources_connect_with_sslmode_require(
    pg_tls: None, pg_server: str, pg_url: str
) -> None:
    url = with_query(pg_url, sslmode="require")
    database = urlsplit(pg_url).path.lstrip("/")
    engine = make_engine(url)
    native = PostgresResource(url)
    reservation = ReservationResource(url)
    try:
        log = RecordLog(engine, "tls_log")
        log.append([LogRow("tx-1", "COMMIT", b"body")])
        assert [row.kind for row in log.rows_for(["tx-1"])["tx-1"]] == ["COMMIT"]
        with engine.connect() as conn:
            own = conn.execute(
                sa.text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            ).scalar_one()
            assert own is True
        native.bind("bank-tls")
        assert native.prepared() == set()
        reservation.bind("bank-tls")
        assert reservation.prepared() == set()
        # the pools keep their connections: the log's, the native resource's and the reservation
        # resource's; every one of them encrypted
        seen = ssl_of_connections(pg_server, database)
        assert len(seen) >= 3 and all(seen), seen
    finally:
        native.close()
        reservation.close()
        engine.dispose()


def test_verify_full_checks_the_server_against_the_root_given(
    pg_tls: None, pg_server: str, pki: Pki
) -> None:
    trusted = make_engine(with_query(pg_server, sslmode="verify-full", sslrootcert=pki.ca.cert))
    try:
        check_connection(trusted)
    finally:
        trusted.dispose()
    stranger = make_engine(with_query(pg_server, sslmode="verify-full", sslrootcert=pki.other.cert))
    try:
        with pytest.raises(ConfigurationError, match="certificate verify failed"):
            check_connection(stranger)
    finally:
        stranger.dispose()
