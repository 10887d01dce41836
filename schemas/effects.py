"""The vocabulary both sans-IO cores use to tell their drivers what to do.

A core's ``handle(event, now_ms)`` returns a list of effects that its driver performs in order,
with one liberty (architecture §5): a driver may batch the ``Persist`` effects of many events into
one log transaction, provided every ``Persist`` that precedes a ``Send`` in a list is durable before
that ``Send`` leaves. Unforced records may be lost in a crash; forced ones may not.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.messages import Protocol
from schemas.records import Record

#: (purpose, tx_id): at most one timer per purpose and transaction
TimerKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Persist:
    record: Record
    force: bool


@dataclass(frozen=True, slots=True)
class Send:
    queue: str
    message: Protocol
    #: W3C trace context of the transaction, carried in the AMQP headers
    traceparent: str = ""


@dataclass(frozen=True, slots=True)
class StartTimer:
    key: TimerKey
    deadline_ms: int


@dataclass(frozen=True, slots=True)
class CancelTimer:
    key: TimerKey


@dataclass(frozen=True, slots=True)
class Forget:
    """The core dropped the transaction from memory; the driver may drop what it keeps for it."""

    tx_id: str


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """A (state, event) pair outside the table, or a message that contradicts the log.

    The driver reports it (log, metric; dead-letter queue when it came from a message); the core's
    state is unchanged by it.
    """

    tx_id: str
    description: str


@dataclass(frozen=True, slots=True)
class Incoming:
    """Event: a decoded message, with the trace context of the AMQP message that carried it."""

    message: Protocol
    traceparent: str = ""


@dataclass(frozen=True, slots=True)
class TimerFired:
    key: TimerKey
