"""The boundary check every inbound message passes before a core or a driver sees it.

Decoding (``schemas.codec``) checks types; this module checks what types cannot say: lengths and
character sets of ids and names, counts, sizes, and times bounded by the deployment's limits. A
message that fails is dead-lettered by the driver with the reason, and nothing else happens. The
same limits are what the client checks before it sends, so that a well-behaved application learns
of a limit from a typed error rather than from a silent dead letter.

Pure: the time comes in as an argument.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import msgspec

from schemas import topology
from schemas.errors import ProtocolError
from schemas.messages import (
    Abort,
    Ack,
    Begin,
    Commit,
    Envelope,
    Heartbeat,
    Inquire,
    Message,
    Outcome,
    Prepare,
    Protocol,
    StatusQuery,
    Vote,
)

#: PostgreSQL's gid holds 199 bytes: "twophase:" + a participant name (at most 100) + ":" leave
#: 89 for the tx_id; a little is kept in reserve.
TX_ID_HARD_MAX = 88
#: at most this many protocol messages travel in one envelope (the driver's packing limit)
ENVELOPE_MAX = 256
#: how far ahead of this process's clock a sender's clock may run (NTP-synchronised hosts)
CLOCK_SKEW_MS = 60_000

_TX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+=-]*")
_OPERATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")
_REPLY_TO = re.compile(re.escape(topology.CLIENT_QUEUE_PREFIX) + r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_args_encoder = msgspec.json.Encoder()


class InvalidMessage(ProtocolError, ValueError):
    """A message outside the limits or the alphabet of ids and names; says which and why."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one deployment accepts; every process of it must use the same values."""

    #: an AMQP message body (one message, or one envelope of many)
    max_message_bytes: int = 2 * 1024 * 1024
    max_branches: int = 64
    #: one branch's ``args``, encoded as JSON
    max_args_bytes: int = 16 * 1024
    #: reasons (votes, aborts, outcomes) longer than this are cut, never refused
    max_reason_bytes: int = 1_000
    #: a transaction's vote timeout, and so how far ahead a PREPARE's deadline may lie
    max_timeout_ms: int = 600_000
    min_timeout_ms: int = 10
    max_tx_id_length: int = 64
    #: heartbeat periods outside this range are refused: a huge one would keep a dead
    #: participant "up" for as long
    min_heartbeat_interval_ms: int = 10
    max_heartbeat_interval_ms: int = 30_000

    def __post_init__(self) -> None:
        if not 1 <= self.max_tx_id_length <= TX_ID_HARD_MAX:
            raise ValueError(
                f"max_tx_id_length must be 1 to {TX_ID_HARD_MAX} (PostgreSQL's gid holds 199 "
                f"bytes with the participant's name), got {self.max_tx_id_length}"
            )
        for name in ("max_message_bytes", "max_branches", "max_args_bytes", "max_reason_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.min_timeout_ms <= self.max_timeout_ms:
            raise ValueError("min_timeout_ms must be at least 1 and at most max_timeout_ms")


DEFAULT_LIMITS = Limits()


def cut(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, on a character boundary."""
    raw = text.encode("utf-8", errors="replace")
    if len(raw) <= max_bytes:
        return text
    return raw[: max(0, max_bytes - 3)].decode("utf-8", errors="ignore") + "..."


def tx_id_problem(tx_id: str, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """Why ``tx_id`` is not acceptable, or None."""
    if not tx_id:
        return "tx_id is empty"
    if len(tx_id) > limits.max_tx_id_length:
        return f"tx_id is {len(tx_id)} characters long (at most {limits.max_tx_id_length})"
    if _TX_ID.fullmatch(tx_id) is None:
        return (
            f"tx_id {_shown(tx_id)} has characters outside letters, digits and _ . : @ + = - "
            "(or does not start with a letter or digit)"
        )
    return None


def participant_problem(name: str) -> str | None:
    if topology.is_valid_participant_name(name):
        return None
    return f"invalid participant name {_shown(name)}"


def operation_problem(name: str) -> str | None:
    if _OPERATION.fullmatch(name) is not None:
        return None
    return f"invalid operation name {_shown(name)}"


def args_problem(args: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> str | None:
    size = len(_args_encoder.encode(args))
    if size > limits.max_args_bytes:
        return f"args are {size} bytes encoded (at most {limits.max_args_bytes})"
    return None


def timeout_problem(timeout_ms: int, limits: Limits = DEFAULT_LIMITS) -> str | None:
    if limits.min_timeout_ms <= timeout_ms <= limits.max_timeout_ms:
        return None
    return (
        f"timeout {timeout_ms} ms is outside [{limits.min_timeout_ms}, {limits.max_timeout_ms}] ms"
    )


def size_problem(size: int, limits: Limits = DEFAULT_LIMITS) -> str | None:
    if size <= limits.max_message_bytes:
        return None
    return f"message is {size} bytes (at most {limits.max_message_bytes})"


def traceparent_or_empty(value: str) -> str:
    """A W3C ``traceparent`` as sent, or "" for anything else (tracing is best effort)."""
    return value if _TRACEPARENT.fullmatch(value) else ""


def begin_problem(begin: Begin, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """Why the client library must not send ``begin`` (the coordinator would dead-letter it)."""
    return _first(_begin_checks(begin, limits))


def check(
    message: Message,
    now_ms: int,
    limits: Limits = DEFAULT_LIMITS,
    accepts: tuple[type[Any], ...] | None = None,
) -> Message:
    """``message`` with over-long reasons cut, or InvalidMessage saying what is wrong.

    ``accepts`` lists the protocol message types the receiving queue takes (None: any).
    """
    if isinstance(message, Envelope):
        if not message.messages:
            raise InvalidMessage("envelope is empty")
        if len(message.messages) > ENVELOPE_MAX:
            raise InvalidMessage(
                f"envelope holds {len(message.messages)} messages (at most {ENVELOPE_MAX})"
            )
        items = tuple(
            msgspec.structs.replace(
                item,
                message=_checked(item.message, now_ms, limits, accepts),
                traceparent=traceparent_or_empty(item.traceparent),
            )
            for item in message.messages
        )
        return msgspec.structs.replace(message, messages=items)
    return _checked(message, now_ms, limits, accepts)


def _checked(
    message: Protocol, now_ms: int, limits: Limits, accepts: tuple[type[Any], ...] | None
) -> Protocol:
    kind = type(message)
    if accepts is not None and kind not in accepts:
        raise InvalidMessage(f"a {kind.__name__} is not accepted on this queue")
    problem = _first(_CHECKS[kind](message, now_ms, limits))
    if problem is not None:
        raise InvalidMessage(f"{kind.__name__}: {problem}")
    reason = getattr(message, "reason", "")
    if len(reason) > limits.max_reason_bytes // 4:  # else it cannot exceed the limit in UTF-8
        shortened = cut(reason, limits.max_reason_bytes)
        if shortened != reason:
            return msgspec.structs.replace(message, reason=shortened)
    return message


def _first(problems: Any) -> str | None:
    return next((p for p in problems if p is not None), None)


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "...")


def _begin_checks(begin: Begin, limits: Limits) -> Any:
    yield tx_id_problem(begin.tx_id, limits)
    yield timeout_problem(begin.timeout_ms, limits)
    yield _reply_to_problem(begin.reply_to)
    if not 1 <= len(begin.branches) <= limits.max_branches:
        yield f"{len(begin.branches)} branches (1 to {limits.max_branches})"
    for branch in begin.branches:
        yield participant_problem(branch.participant)
        yield operation_problem(branch.operation)
        yield args_problem(branch.args, limits)


def _prepare_checks(prepare: Prepare, now_ms: int, limits: Limits) -> Any:
    yield tx_id_problem(prepare.tx_id, limits)
    yield participant_problem(prepare.participant)
    yield operation_problem(prepare.operation)
    yield args_problem(prepare.args, limits)
    if not 1 <= len(prepare.participants) <= limits.max_branches:
        yield f"{len(prepare.participants)} participants (1 to {limits.max_branches})"
    for name in prepare.participants:
        yield participant_problem(name)
    latest = now_ms + limits.max_timeout_ms + CLOCK_SKEW_MS
    if not 0 < prepare.deadline_ms <= latest:
        yield f"deadline {prepare.deadline_ms} is not within the maximum timeout from now"


def _heartbeat_checks(beat: Heartbeat, now_ms: int, limits: Limits) -> Any:
    yield participant_problem(beat.participant)
    low, high = limits.min_heartbeat_interval_ms, limits.max_heartbeat_interval_ms
    if not low <= beat.interval_ms <= high:
        yield f"interval {beat.interval_ms} ms is outside [{low}, {high}] ms"
    if beat.sent_at_ms > now_ms + CLOCK_SKEW_MS:
        yield f"sent_at_ms {beat.sent_at_ms} lies in the future"


def _outcome_checks(outcome: Outcome, limits: Limits) -> Any:
    yield tx_id_problem(outcome.tx_id, limits)
    if outcome.at_fault is not None:
        yield participant_problem(outcome.at_fault)


def _reply_to_problem(reply_to: str) -> str | None:
    if _REPLY_TO.fullmatch(reply_to) is not None:
        return None
    return f"reply_to {_shown(reply_to)} is not a client queue ({topology.CLIENT_QUEUE_PREFIX}ID)"


def _tx_and_participant(message: Vote | Commit | Abort | Ack | Inquire, limits: Limits) -> Any:
    yield tx_id_problem(message.tx_id, limits)
    yield participant_problem(message.participant)


_CHECKS: dict[type[Any], Any] = {
    Begin: lambda m, _now, limits: _begin_checks(m, limits),
    Prepare: _prepare_checks,
    Vote: lambda m, _now, limits: _tx_and_participant(m, limits),
    Commit: lambda m, _now, limits: _tx_and_participant(m, limits),
    Abort: lambda m, _now, limits: _tx_and_participant(m, limits),
    Ack: lambda m, _now, limits: _tx_and_participant(m, limits),
    Inquire: lambda m, _now, limits: _tx_and_participant(m, limits),
    Heartbeat: _heartbeat_checks,
    Outcome: lambda m, _now, limits: _outcome_checks(m, limits),
    StatusQuery: lambda m, _now, limits: (
        tx_id_problem(m.tx_id, limits),
        _reply_to_problem(m.reply_to),
    ),
}

#: what each queue takes: anything else there is dead-lettered
COORDINATOR_ACCEPTS: tuple[type[Any], ...] = (Begin, Vote, Ack, Inquire, Heartbeat, StatusQuery)
PARTICIPANT_ACCEPTS: tuple[type[Any], ...] = (Prepare, Commit, Abort)
CLIENT_ACCEPTS: tuple[type[Any], ...] = (Outcome,)
