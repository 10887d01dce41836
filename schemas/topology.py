"""RabbitMQ names shared by every process: data only, no pika calls.

One durable direct exchange carries all protocol traffic; every queue is bound to it under its own
name, so a routing key *is* a queue name and ``mandatory`` publishing detects a missing queue.
Rejected or undecodable messages go to a fanout dead-letter exchange and its single durable queue.
"""

from __future__ import annotations

import re

EXCHANGE = "twophase"
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


def participant_queue(name: str) -> str:
    if not is_valid_participant_name(name):
        raise ValueError(
            f"invalid participant name {name!r}: use letters, digits, '.', '_' or '-' (max 100)"
        )
    return PARTICIPANT_QUEUE_PREFIX + name


def client_queue(client_id: str) -> str:
    return CLIENT_QUEUE_PREFIX + client_id


def durable_queue_arguments() -> dict[str, object]:
    """Arguments every durable protocol queue is declared with (must match on every declare)."""
    return {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE, "x-queue-type": "classic"}
