"""compose/rabbitmq/definitions.json on a real RabbitMQ: every account can do its job and nothing
else (issue 14, "Least privilege"; docs/architecture.md §11.1).

The management plugin (the usual importer of a definitions file) is not assumed: the file's
exchanges, queues and bindings are declared by an administrator, its users, permissions and topic
permissions are applied with ``rabbitmqctl``, in a fresh vhost and under user names unique to
this run, so the file itself is what is tested. Every forbidden read (consume), write (publish),
configure (declare, delete) and bind must end in ``ACCESS_REFUSED`` (403).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pika.exceptions
import pytest

from coordinator.client import Client
from runtime.amqp import AmqpChannel
from schemas import topology
from schemas.permissions import client_reply_queue

pytestmark = pytest.mark.integration

DEFINITIONS = Path(__file__).resolve().parents[2] / "compose" / "rabbitmq" / "definitions.json"
ACCOUNTS = ("coordinator", "bank-a", "bank-b", "client")
#: the client identity the compose account ``client`` is for
CLIENT_NAME = "web"

Op = Callable[[Any], object]


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=True)


@dataclass(frozen=True)
class Broker:
    admin_url: str
    #: account name in definitions.json -> its AMQP URL in the test vhost
    urls: dict[str, str]


@pytest.fixture(scope="module")
def defined(broker: str) -> Iterator[Broker]:
    """A vhost holding what definitions.json defines; deleted with its users even on failure."""
    definitions: dict[str, Any] = json.loads(DEFINITIONS.read_text())
    run = uuid.uuid4().hex[:10]
    vhost = f"twophase-least-privilege-{run}"
    parts = urlsplit(broker)

    def url(user: str, password: str) -> str:
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, "/" + quote(vhost, safe=""), "", ""))

    users = {u["name"]: u for u in definitions["users"]}
    created: list[str] = []
    _ctl("add_vhost", vhost)
    try:
        _ctl("set_permissions", "-p", vhost, parts.username or "guest", ".*", ".*", ".*")
        admin_url = urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), "", ""))
        _declare_topology(admin_url, definitions)
        urls: dict[str, str] = {}
        for name in ACCOUNTS:
            unique = f"lp-{run}-{name}"
            _ctl("add_user", unique, users[name]["password"])
            created.append(unique)
            urls[name] = url(unique, users[name]["password"])
        for p in definitions["permissions"]:
            if p["user"] in urls:
                unique = f"lp-{run}-{p['user']}"
                _ctl("set_permissions", "-p", vhost, unique, p["configure"], p["write"], p["read"])
        for t in definitions["topic_permissions"]:
            unique = f"lp-{run}-{t['user']}"
            _ctl("set_topic_permissions", "-p", vhost, unique, t["exchange"], t["write"], t["read"])
        yield Broker(admin_url, urls)
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)
        for unique in created:
            subprocess.run(["rabbitmqctl", "delete_user", unique], capture_output=True, timeout=60)


def _declare_topology(admin_url: str, definitions: dict[str, Any]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(admin_url))
    try:
        channel = connection.channel()
        for e in definitions["exchanges"]:
            channel.exchange_declare(
                e["name"], e["type"], durable=e["durable"], auto_delete=e["auto_delete"]
            )
        for q in definitions["queues"]:
            channel.queue_declare(q["name"], durable=q["durable"], arguments=q["arguments"])
        for b in definitions["bindings"]:
            channel.queue_bind(b["destination"], b["source"], routing_key=b["routing_key"])
        # queues of others that the accounts must not reach: a client's reply queue (durable
        # here, so that refusals are about permissions, not about another connection's
        # exclusive queue) and one of another client
        for name in (OWN_REPLY, OTHER_REPLY):
            channel.queue_declare(name, durable=True)
            channel.queue_bind(name, topology.EXCHANGE, routing_key=name)
    finally:
        connection.close()


OWN_REPLY = client_reply_queue(CLIENT_NAME, uuid.uuid4().hex)
OTHER_REPLY = client_reply_queue("other", uuid.uuid4().hex)
BANK = {name: topology.participant_queue(name) for name in ("bank-a", "bank-b")}
COORD = topology.COORDINATOR_QUEUE


def _refusal(url: str, op: Op) -> str | None:
    """None if ``op`` on a fresh confirm-mode channel ends in ACCESS_REFUSED, else what it did."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # a refused publish is only seen through its confirm
        try:
            op(channel)
        except pika.exceptions.ChannelClosedByBroker as exc:
            return None if exc.reply_code == 403 else f"closed {exc.reply_code} {exc.reply_text}"
        return "allowed"
    finally:
        if connection.is_open:
            connection.close()


def _publish(exchange: str, key: str) -> Op:
    return lambda ch: ch.basic_publish(exchange, key, b"forged", mandatory=False)


def _consume(queue: str) -> Op:
    return lambda ch: ch.basic_consume(queue, lambda *_: None)


def _get(queue: str) -> Op:
    return lambda ch: ch.basic_get(queue)


def _declare(queue: str) -> Op:
    return lambda ch: ch.queue_declare(
        queue, durable=True, arguments=topology.durable_queue_arguments()
    )


def _bind(queue: str, key: str, exchange: str = topology.EXCHANGE) -> Op:
    return lambda ch: ch.queue_bind(queue, exchange, routing_key=key)


def _common_forbidden(own: str) -> dict[str, Op]:
    """What no account may do, whatever its queue ``own``."""
    return {
        "publish to the default exchange": _publish("", BANK["bank-a"]),
        "publish to amq.topic": _publish("amq.topic", COORD),
        "publish to amq.direct": _publish("amq.direct", COORD),
        "publish to the old direct exchange": _publish("twophase", COORD),
        "declare an exchange of its own": lambda ch: ch.exchange_declare("twophase.mine", "topic"),
        "consume the dead-letter queue": _get(topology.DEAD_LETTER_QUEUE),
        "bind its queue with #": _bind(own, "#"),
        "bind its queue with a wildcard": _bind(own, "twophase.*.*"),
        "bind its queue to amq.topic": _bind(own, "#", "amq.topic"),
        "bind its queue to amq.direct": _bind(own, own, "amq.direct"),
        "bind the exchange to itself": lambda ch: ch.exchange_bind(
            topology.EXCHANGE, topology.EXCHANGE, routing_key="#"
        ),
        "declare another client's queue": _declare(OTHER_REPLY),
        "bind another client's queue": _bind(OTHER_REPLY, OTHER_REPLY),
    }


def _participant_forbidden(name: str) -> dict[str, Op]:
    own, other = BANK[name], BANK["bank-b" if name == "bank-a" else "bank-a"]
    return {
        **_common_forbidden(own),
        "consume the other bank's queue": _consume(other),
        "get from the other bank's queue": _get(other),
        "consume the coordinator's queue": _consume(COORD),
        "consume a client's reply queue": _get(OWN_REPLY),
        "publish to the other bank": _publish(topology.EXCHANGE, other),
        "publish to itself": _publish(topology.EXCHANGE, own),
        "publish to a client": _publish(topology.EXCHANGE, OWN_REPLY),
        "publish with a wildcard key": _publish(topology.EXCHANGE, "twophase.participant.*"),
        "declare the other bank's queue": _declare(other),
        "declare the coordinator's queue": _declare(COORD),
        "delete the coordinator's queue": lambda ch: ch.queue_delete(COORD),
        "delete the other bank's queue": lambda ch: ch.queue_delete(other),
        "bind its queue to the other bank's traffic": _bind(own, other),
        "bind its queue to the coordinator's traffic": _bind(own, COORD),
        "bind its queue to a client's traffic": _bind(own, OWN_REPLY),
        "bind the other bank's queue": _bind(other, other),
        "bind the coordinator's queue": _bind(COORD, COORD),
    }


def _client_forbidden() -> dict[str, Op]:
    return {
        **_common_forbidden(OWN_REPLY),
        **{f"consume {bank}'s queue": _consume(queue) for bank, queue in BANK.items()},
        "consume the coordinator's queue": _consume(COORD),
        "consume another client's queue": _get(OTHER_REPLY),
        **{f"publish to {bank}": _publish(topology.EXCHANGE, q) for bank, q in BANK.items()},
        "publish to another client": _publish(topology.EXCHANGE, OTHER_REPLY),
        "publish to its own reply queue": _publish(topology.EXCHANGE, OWN_REPLY),
        **{f"declare {bank}'s queue": _declare(queue) for bank, queue in BANK.items()},
        "declare the coordinator's queue": _declare(COORD),
        "delete the coordinator's queue": lambda ch: ch.queue_delete(COORD),
        # the hole a direct exchange leaves: its own queue bound under a bank's name
        **{f"bind its queue to {bank}'s traffic": _bind(OWN_REPLY, q) for bank, q in BANK.items()},
        "bind its queue to the coordinator's traffic": _bind(OWN_REPLY, COORD),
        "bind its queue to another client's traffic": _bind(OWN_REPLY, OTHER_REPLY),
        "bind the coordinator's queue": _bind(COORD, COORD),
    }


def _coordinator_forbidden() -> dict[str, Op]:
    return {
        **_common_forbidden(COORD),
        **{f"consume {bank}'s queue": _consume(queue) for bank, queue in BANK.items()},
        "consume a client's reply queue": _get(OWN_REPLY),
        **{f"declare {bank}'s queue": _declare(queue) for bank, queue in BANK.items()},
        **{f"bind its queue to {bank}'s traffic": _bind(COORD, q) for bank, q in BANK.items()},
        "bind its queue to a client's traffic": _bind(COORD, OWN_REPLY),
        **{f"bind {bank}'s queue": _bind(queue, queue) for bank, queue in BANK.items()},
        "publish to an unknown kind of queue": _publish(topology.EXCHANGE, "twophase.other"),
    }


FORBIDDEN: dict[str, Callable[[], dict[str, Op]]] = {
    "coordinator": _coordinator_forbidden,
    "bank-a": lambda: _participant_forbidden("bank-a"),
    "bank-b": lambda: _participant_forbidden("bank-b"),
    "client": _client_forbidden,
}


@pytest.mark.parametrize("account", ACCOUNTS)
def test_every_forbidden_operation_is_access_refused(defined: Broker, account: str) -> None:
    url = defined.urls[account]
    wrong = {
        what: outcome
        for what, op in FORBIDDEN[account]().items()
        if (outcome := _refusal(url, op)) is not None
    }
    assert not wrong, f"{account} was not refused: {wrong}"


def _ready(admin_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(admin_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def _purge(admin_url: str, *queues: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(admin_url))
    try:
        channel = connection.channel()
        for queue in queues:
            channel.queue_purge(queue)
    finally:
        connection.close()


@pytest.mark.parametrize("bank", ["bank-a", "bank-b"])
def test_a_participant_declares_consumes_its_queue_and_writes_to_the_coordinator(
    defined: Broker, bank: str
) -> None:
    """As participant/worker.py does at start, then a vote's publish and a dead-lettering."""
    _purge(defined.admin_url, COORD, topology.DEAD_LETTER_QUEUE)
    channel = AmqpChannel(defined.urls[bank], connection_name=f"least-privilege-{bank}")
    try:
        channel.declare_queue(BANK[bank])
        channel.consume(BANK[bank])
        channel.publish(COORD, b"a vote")
        channel.wait_for_confirms()
    finally:
        channel.close()
    assert _ready(defined.admin_url, COORD) == 1


def test_the_coordinator_declares_consumes_its_queue_and_writes_to_everyone(
    defined: Broker,
) -> None:
    _purge(defined.admin_url, *BANK.values(), OWN_REPLY)
    channel = AmqpChannel(defined.urls["coordinator"], connection_name="least-privilege-coord")
    try:
        channel.declare_queue(COORD)
        channel.consume(COORD)
        for queue in (*BANK.values(), OWN_REPLY):
            channel.publish(queue, b"a command")
        channel.wait_for_confirms()
    finally:
        channel.close()
    for queue in (*BANK.values(), OWN_REPLY):
        assert _ready(defined.admin_url, queue) == 1, queue


def test_a_client_declares_its_reply_queue_and_sends_begin(defined: Broker) -> None:
    """With its key (client:web) a client's reply queue is client_reply_queue; without one,
    twophase.client.<uuid hex>: the compose account allows both, as coordinator/client.py
    declares them."""
    _purge(defined.admin_url, COORD)
    reply = client_reply_queue(CLIENT_NAME, uuid.uuid4().hex)
    channel = AmqpChannel(defined.urls["client"], connection_name="least-privilege-client")
    try:
        channel.declare_queue(reply, durable=False, exclusive=True)
        channel.consume(reply)
        channel.publish(COORD, b"a begin")
        channel.wait_for_confirms()
    finally:
        channel.close()
    assert _ready(defined.admin_url, COORD) == 1
    with Client(defined.urls["client"], connect_attempts=1) as client:  # no key: the uuid form
        assert client.reply_queue == topology.client_queue(client.client_id)
