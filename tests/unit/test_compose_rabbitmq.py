"""The compose demo's RabbitMQ accounts (compose/rabbitmq/definitions.json): each service has its
own user, and each user's permissions and topic permissions grant what the code needs and nothing
that reaches another's queue (issue 14, "Least privilege"; compose/README.md).

Parsed, never applied: ``tests/integration/test_least_privilege.py`` applies the file to a real
broker. The checks model what each process declares, binds, consumes and publishes at start
(``runtime/amqp.py``, ``coordinator/service.py``, ``participant/worker.py``,
``coordinator/client.py``) with RabbitMQ's access-control table; when those change, change
``required`` below as well.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import pytest

from schemas import topology
from schemas.permissions import client_reply_queue
from tests.unit.test_compose import (
    CLIENT,
    DEFAULT_EXCHANGE,
    allowed,
    amqp_user,
    app_services,
    definitions,
    env,
    participant_services,
    permissions,
    topic_permissions,
    users,
)


def test_each_service_uses_its_own_rabbitmq_user() -> None:
    seen: dict[str, str] = {}
    for name in app_services():
        url = env(name)["TWOPHASE_AMQP_URL"]
        parts = urlsplit(url)
        assert (parts.scheme, parts.hostname, parts.port) == ("amqp", "rabbitmq", 5672), name
        user, password, vhost = amqp_user(url)
        assert user in users(), f"{name}: no RabbitMQ user {user!r} in definitions.json"
        assert users()[user].get("password") == password, f"{name}: password of {user!r}"
        assert "administrator" not in str(users()[user].get("tags", "")), name
        permissions(user, vhost)
        assert user not in seen, f"{name} shares user {user!r} with {seen.get(user)}"
        seen[user] = name
    assert seen["coordinator"] == "coordinator"
    for name in participant_services():
        assert seen[env(name)["TWOPHASE_PARTICIPANT_NAME"]] == name


def test_every_user_has_a_password_and_tags() -> None:
    for user in definitions()["users"]:
        assert user.get("password") or user.get("password_hash"), user["name"]
        assert "tags" in user, user["name"]
    assert "guest" not in users(), "no default user: every process has its own"
    assert {"coordinator", "client", "admin"} <= set(users())


def _shared() -> list[tuple[str, str]]:
    """What every AmqpChannel connect needs: declare both exchanges and the dead-letter queue,
    bind the dead-letter queue to the dead-letter exchange."""
    return [
        ("configure", topology.EXCHANGE),
        ("configure", topology.DEAD_LETTER_EXCHANGE),
        ("configure", topology.DEAD_LETTER_QUEUE),
        ("write", topology.DEAD_LETTER_QUEUE),
        ("read", topology.DEAD_LETTER_EXCHANGE),
    ]


def _declare_and_bind(queue: str) -> list[tuple[str, str]]:
    # A new queue with x-dead-letter-exchange also needs read on the queue and write on the DLX
    # (each process may create its own queue); the binding needs the topic read of its key.
    return [
        ("configure", queue),
        ("write", queue),
        ("read", queue),
        ("write", topology.DEAD_LETTER_EXCHANGE),
        ("read", topology.EXCHANGE),
        ("topic-read", queue),
    ]


def _lock(queue: str) -> list[tuple[str, str]]:
    # one instance per name: an exclusive queue of the holder's connection (runtime/instances.py)
    return [("configure", topology.lock_queue(queue))]


def _consume(queue: str) -> list[tuple[str, str]]:
    return [("read", queue)]


def _publish(exchange: str, key: str = "") -> list[tuple[str, str]]:
    return [("write", exchange), *([("topic-write", key)] if exchange == topology.EXCHANGE else [])]


def required(user: str) -> list[tuple[str, str]]:
    """(permission, resource name) the user's process needs with the code as written."""
    if user == "coordinator":
        queue = topology.COORDINATOR_QUEUE
        return [
            *_shared(),
            *_declare_and_bind(queue),
            *_lock(queue),
            *_consume(queue),
            *_publish(topology.EXCHANGE, topology.participant_queue("bank-c")),
            *_publish(topology.EXCHANGE, client_reply_queue(CLIENT, uuid.uuid4().hex)),
            *_publish(topology.EXCHANGE, topology.client_queue(uuid.uuid4().hex)),
            *_publish(topology.DEAD_LETTER_EXCHANGE),  # undecodable messages
        ]
    if user == "client":
        # with its key (client:web) and without one (a uuid's hex): coordinator/client.py
        queues = [
            client_reply_queue(CLIENT, uuid.uuid4().hex),
            topology.client_queue(uuid.uuid4().hex),
        ]
        return [
            *_shared(),
            *[need for queue in queues for need in _declare_and_bind(queue) + _consume(queue)],
            *_publish(topology.EXCHANGE, topology.COORDINATOR_QUEUE),
            *_publish(topology.DEAD_LETTER_EXCHANGE),  # replies that fail verification
        ]
    queue = topology.participant_queue(user)
    return [
        *_shared(),
        *_declare_and_bind(queue),
        *_lock(queue),
        *_consume(queue),
        *_publish(topology.EXCHANGE, topology.COORDINATOR_QUEUE),
        *_publish(topology.DEAD_LETTER_EXCHANGE),
    ]


def protocol_users() -> list[str]:
    participants = [env(name)["TWOPHASE_PARTICIPANT_NAME"] for name in participant_services()]
    return ["coordinator", "client", *participants]


@pytest.mark.parametrize("user", ["coordinator", "client", "bank-a", "bank-b"])
def test_permissions_grant_what_the_code_needs(user: str) -> None:
    granted = permissions(user) | {f"topic-{k}": v for k, v in topic_permissions(user).items()}
    missing = [(perm, name) for perm, name in required(user) if not allowed(granted[perm], name)]
    assert not missing, f"{user} would be refused: {missing}"


def _others(user: str) -> list[str]:
    """Queues ``user`` has no business with, including names that extend its own."""
    participants = [u for u in protocol_users() if u not in ("coordinator", "client")]
    queues = [topology.participant_queue(p) for p in participants if p != user]
    queues += [topology.participant_queue("bank-c"), topology.DEAD_LETTER_QUEUE]
    queues += [name + "x" for name in (topology.COORDINATOR_QUEUE, topology.EXCHANGE)]
    if user != "coordinator":
        queues.append(topology.COORDINATOR_QUEUE)
    if user not in ("coordinator", "client"):
        queues.append(topology.participant_queue(user) + "2")
    if user == "client":
        queues.append(client_reply_queue("other", uuid.uuid4().hex))
    else:
        queues += [topology.client_queue(uuid.uuid4().hex), client_reply_queue(CLIENT, "x")]
    return queues


@pytest.mark.parametrize("user", ["coordinator", "client", "bank-a", "bank-b"])
def test_permissions_are_least_privilege(user: str) -> None:
    granted = permissions(user)
    for name in _others(user):
        assert not allowed(granted["read"], name), f"{user} may consume {name}"
    for name in _others(user):
        if name == topology.DEAD_LETTER_QUEUE:
            continue  # declared and bound by every process: see compose/README.md
        assert not allowed(granted["configure"], name), f"{user} may configure {name}"
        assert not allowed(granted["write"], name), f"{user} may bind {name}"
    # Routing keys on the protocol exchange: a queue of its own may be bound only under its own
    # name, and nobody but the coordinator sends anywhere but to the coordinator.
    topic = topic_permissions(user)
    for name in [*_others(user), "#", "twophase.*", "twophase.participant.*"]:
        assert not allowed(topic["read"], name), f"{user} may bind a queue to {name}'s traffic"
    for name in ["#", "twophase.*", "twophase.participant.*", topology.DEAD_LETTER_QUEUE]:
        assert not allowed(topic["write"], name), f"{user} may publish with key {name}"
    if user != "coordinator":
        for name in set(_others(user)) - {topology.COORDINATOR_QUEUE}:
            assert not allowed(topic["write"], name), f"{user} may publish to {name}"
        if user != "client":
            assert not allowed(topic["write"], topology.participant_queue(user))
    # Publishing is checked on the exchange: nobody may use the default exchange (which reaches
    # any queue by name) nor an exchange other than the topology's.
    for exchange in (DEFAULT_EXCHANGE, "amq.direct", "amq.topic", "twophase.other", "twophase"):
        assert not allowed(granted["write"], exchange), f"{user} may publish to {exchange}"


def test_participant_reads_only_its_own_queue() -> None:
    coordinator_queue = topology.COORDINATOR_QUEUE
    for name in participant_services():
        participant = env(name)["TWOPHASE_PARTICIPANT_NAME"]
        read = permissions(amqp_user(env(name)["TWOPHASE_AMQP_URL"])[0])["read"]
        assert allowed(read, topology.participant_queue(participant))
        assert not allowed(read, coordinator_queue)
        for other in participant_services():
            if other != name:
                other_queue = topology.participant_queue(env(other)["TWOPHASE_PARTICIPANT_NAME"])
                assert not allowed(read, other_queue), f"{name} may read {other_queue}"


def test_coordinator_reads_only_its_own_queue() -> None:
    read = permissions("coordinator")["read"]
    assert allowed(read, topology.COORDINATOR_QUEUE)
    for name in participant_services():
        queue = topology.participant_queue(env(name)["TWOPHASE_PARTICIPANT_NAME"])
        assert not allowed(read, queue)


def test_every_protocol_account_has_topic_permissions() -> None:
    """A user without topic permissions on a topic exchange may use every routing key."""
    for user in protocol_users():
        topic_permissions(user)
    assert {t["exchange"] for t in definitions()["topic_permissions"]} == {topology.EXCHANGE}


def test_the_client_account_is_client_web() -> None:
    read = topic_permissions("client")["read"]
    assert allowed(read, client_reply_queue(CLIENT, uuid.uuid4().hex))
    assert not allowed(read, client_reply_queue("other", uuid.uuid4().hex))
    assert not allowed(read, topology.client_queue(CLIENT))


def test_the_coordinator_may_publish_to_every_queue_a_valid_message_names() -> None:
    """A refused publish closes the coordinator's channel (ACCESS_REFUSED), and the message that
    caused it would be redelivered: its topic write must cover every participant name and every
    reply_to that schemas/validation.py lets through."""
    from schemas.validation import _REPLY_TO

    write = topic_permissions("coordinator")["write"]
    for name in ("a", "A" * 100, "bank-a", "x.y_z-0", "9"):
        assert topology.is_valid_participant_name(name)
        assert allowed(write, topology.participant_queue(name)), name
    for reply_to in (
        topology.client_queue("a"),
        topology.client_queue("a" + "._-9" * 24 + "abc"),
        client_reply_queue(CLIENT, uuid.uuid4().hex),
    ):
        assert _REPLY_TO.fullmatch(reply_to) is not None
        assert allowed(write, reply_to), reply_to
