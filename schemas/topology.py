"""RabbitMQ names shared by every process: data only, no pika calls.

One durable topic exchange carries all protocol traffic; every queue is bound to it under its own
name (no wildcards: the names cannot hold ``*`` or ``#``), so a routing key *is* a queue name and
``mandatory`` publishing detects a missing queue. Topic, not direct, because RabbitMQ's topic
permissions restrict the routing key of a publish and the key of a binding per account, which is
what keeps a participant or a client from sending to, or binding its queue to receive, another's
traffic (docs/architecture.md §11.1). Each process binds only its own queue.
Rejected or undecodable messages go to a fanout dead-letter exchange and its single durable queue.
"""

from __future__ import annotations

import re

#: a new name: the direct exchange ``twophase`` of older vhosts cannot be re-declared as a topic
#: exchange (PRECONDITION_FAILED), and it is simply no longer used
EXCHANGE = "twophase.topic"
EXCHANGE_TYPE = "topic"
DEAD_LETTER_EXCHANGE = "twophase.dlx"
DEAD_LETTER_QUEUE = "twophase.dead-letter"
COORDINATOR_QUEUE = "twophase.coordinator"
PARTICIPANT_QUEUE_PREFIX = "twophase.participant."
CLIENT_QUEUE_PREFIX = "twophase.client."

#: AMQP header naming why a message was dead-lettered.
ERROR_HEADER = "x-twophase-error"
#: AMQP header carrying the W3C trace context.
TRACEPARENT_HEADER = "traceparent"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def is_valid_participant_name(name: str) -> bool:
    """Participant names become queue names, so they are kept to a safe alphabet."""
    return _NAME.fullmatch(name) is not None


LOCK_QUEUE_PREFIX = "twophase.lock."


def lock_queue(queue: str) -> str:
    """The lock of the service that consumes ``queue`` (``twophase.coordinator`` ->
    ``twophase.lock.coordinator``): an exclusive queue its holder's connection declares
    (runtime/instances.py). Apart from every protocol queue's name, so no participant name can
    make one collide with it."""
    return LOCK_QUEUE_PREFIX + queue.removeprefix("twophase.")


def participant_queue(name: str) -> str:
    if not is_valid_participant_name(name):
        raise ValueError(
            f"invalid participant name {name!r}: use letters, digits, '.', '_' or '-' (max 100)"
        )
    return PARTICIPANT_QUEUE_PREFIX + name


def client_queue(client_id: str) -> str:
    return CLIENT_QUEUE_PREFIX + client_id


#: the types a durable queue may be declared as (``TWOPHASE_QUEUE_TYPE``); exclusive queues, the
#: clients' reply queues, are always classic: quorum queues cannot be exclusive nor auto-delete
QUEUE_TYPES = ("classic", "quorum")
QUEUE_TYPE_ARGUMENT = "x-queue-type"


def _checked(queue_type: str) -> str:
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"queue type {queue_type!r} is not one of {', '.join(QUEUE_TYPES)}")
    return queue_type


def durable_queue_arguments(queue_type: str = "classic") -> dict[str, object]:
    """Arguments every durable protocol queue is declared with (must match on every declare).

    Both types accept them; none of what quorum queues refuse (``x-queue-version``,
    ``x-max-priority``) is used. No ``x-delivery-limit``: docs/architecture.md §11.1."""
    return {
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        QUEUE_TYPE_ARGUMENT: _checked(queue_type),
    }


#: the dead-letter queue keeps at most this many messages / bytes; the oldest go first
DEAD_LETTER_MAX_LENGTH = 100_000
DEAD_LETTER_MAX_BYTES = 256 * 1024 * 1024


def dead_letter_queue_arguments(queue_type: str = "classic") -> dict[str, object]:
    """The dead-letter queue is bounded: a flood of bad messages must not fill the broker.

    Quorum queues take the same bounds (``drop-head`` included). A classic one is declared
    without ``x-queue-type``, as it always was: the broker accepts that for a classic queue
    declared either way, and compose's definitions.json declares it so."""
    bounds: dict[str, object] = {
        "x-max-length": DEAD_LETTER_MAX_LENGTH,
        "x-max-length-bytes": DEAD_LETTER_MAX_BYTES,
        "x-overflow": "drop-head",
    }
    if _checked(queue_type) != "classic":
        bounds[QUEUE_TYPE_ARGUMENT] = queue_type
    return bounds
