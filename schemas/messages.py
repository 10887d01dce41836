"""Protocol messages: a tagged union on ``type``, versioned by ``v``.

Times on the wire are integer milliseconds since the Unix epoch; every process compares them with
its own clock, so deadlines tolerate the skew of NTP-synchronised hosts, not arbitrary skew.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

PROTOCOL_VERSION = 1


class VoteKind(enum.Enum):
    YES = "yes"
    NO = "no"
    READ_ONLY = "read_only"
    #: a one-phase branch is already committed in the participant's resource (the only vote
    #: that is also an outcome; see ``Prepare.one_phase``)
    COMMITTED = "committed"


class OutcomeKind(enum.Enum):
    COMMITTED = "committed"
    ABORTED = "aborted"
    #: answer to a status query while votes are still being collected
    PENDING = "pending"
    #: answer to a status query for a transaction the coordinator has no record of
    UNKNOWN = "unknown"


class Branch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    participant: str
    operation: str
    args: dict[str, Any] = {}


class _Message(
    msgspec.Struct, frozen=True, tag_field="type", forbid_unknown_fields=True, kw_only=True
):
    v: int = PROTOCOL_VERSION


class Begin(_Message, frozen=True, tag="begin"):
    """Client -> coordinator. The client chooses ``tx_id``; resubmitting it is idempotent."""

    tx_id: str
    branches: tuple[Branch, ...]
    timeout_ms: int
    reply_to: str


class Prepare(_Message, frozen=True, tag="prepare"):
    """Coordinator -> participant: run ``operation`` and vote before ``deadline_ms``."""

    tx_id: str
    participant: str
    operation: str
    args: dict[str, Any]
    deadline_ms: int
    participants: tuple[str, ...]
    #: the transaction's only branch: the participant may commit at once and vote COMMITTED
    #: instead of YES (it may also decline, prepare and vote YES as usual)
    one_phase: bool = False


class Vote(_Message, frozen=True, tag="vote"):
    tx_id: str
    participant: str
    vote: VoteKind
    reason: str = ""


class Commit(_Message, frozen=True, tag="commit"):
    tx_id: str
    participant: str


class Abort(_Message, frozen=True, tag="abort"):
    tx_id: str
    participant: str
    reason: str = ""
    #: a question, not an order: abort the one-phase branch unless it committed, and answer
    #: with a Vote, NO (nothing is or will be committed) or COMMITTED. One-phase cannot presume
    #: abort: the branch may have committed without the coordinator hearing of it.
    one_phase: bool = False


class Ack(_Message, frozen=True, tag="ack"):
    """Participant -> coordinator: the COMMIT is durable in the participant's resource."""

    tx_id: str
    participant: str


class Inquire(_Message, frozen=True, tag="inquire"):
    """Participant -> coordinator: a prepared participant asks for the decision."""

    tx_id: str
    participant: str


class Heartbeat(_Message, frozen=True, tag="heartbeat"):
    participant: str
    sent_at_ms: int
    interval_ms: int


class Outcome(_Message, frozen=True, tag="outcome"):
    """Coordinator -> client: the final answer (or PENDING/UNKNOWN to a status query)."""

    tx_id: str
    outcome: OutcomeKind
    reason: str = ""
    #: the participant whose vote, silence or absence caused an abort
    at_fault: str | None = None


class StatusQuery(_Message, frozen=True, tag="status"):
    """Client -> coordinator: what happened to ``tx_id``? Answered with an Outcome."""

    tx_id: str
    reply_to: str


#: every protocol message: what the cores handle
Protocol = (
    Begin | Prepare | Vote | Commit | Abort | Ack | Inquire | Heartbeat | Outcome | StatusQuery
)


class Enveloped(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    message: Protocol
    traceparent: str = ""


class Envelope(_Message, frozen=True, tag="envelope"):
    """Several protocol messages for the same queue in one AMQP message (transport only).

    The receiving driver hands them to its core one by one, in order, exactly as if they had
    arrived back to back; the AMQP message is acked, dead-lettered or redelivered as a whole.
    """

    messages: tuple[Enveloped, ...]


Message = Protocol | Envelope

MESSAGE_TYPES: tuple[type[Any], ...] = (
    Begin,
    Prepare,
    Vote,
    Commit,
    Abort,
    Ack,
    Inquire,
    Heartbeat,
    Outcome,
    StatusQuery,
    Envelope,
)
