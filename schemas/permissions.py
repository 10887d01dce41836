"""Who may send what to whom: identities, the authentication headers and the permission table.

Pure contract (docs/architecture.md §11): the keys and the signatures themselves are in
:mod:`runtime.auth`, which needs ``cryptography``; what a signature must prove, and which sender
may send which message kind to which queue, is decided here, so that a participant written in
another language can read it off one table.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from collections.abc import Iterable
from typing import Any

from schemas import topology
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
from schemas.validation import CLIENT_ACCEPTS, COORDINATOR_ACCEPTS, PARTICIPANT_ACCEPTS

#: AMQP headers of a signed message; the signature covers the first three, the recipient queue
#: and the SHA-256 of the body (runtime.auth.signed_data)
SENDER_HEADER = "x-twophase-sender"
KEY_ID_HEADER = "x-twophase-key-id"
KINDS_HEADER = "x-twophase-kinds"
SIGNATURE_HEADER = "x-twophase-signature"
AUTH_HEADERS = (SENDER_HEADER, KEY_ID_HEADER, KINDS_HEADER, SIGNATURE_HEADER)

#: the three reasons a message is refused for (the dead-letter header says one of them)
BAD_SIGNATURE = "bad signature"
UNKNOWN_KEY = "unknown key"
NOT_PERMITTED = "sender may not send this"

#: a client name: a participant name without "." (the client owns "twophase.client.NAME" and
#: "twophase.client.NAME.*", so a "." would let "web" own "web.admin"'s queues); at most 64
#: characters, so that NAME + "." + a 32-digit instance id still fits a reply_to (100)
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: a client instance's id in its reply queue: with the name, it fits a reply_to (100)
_CLIENT_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,34}")


class Role(enum.Enum):
    COORDINATOR = "coordinator"
    PARTICIPANT = "participant"
    CLIENT = "client"


@dataclasses.dataclass(frozen=True, order=True)
class Identity:
    """A sender: ``coordinator``, ``participant:NAME`` or ``client:NAME`` as text."""

    role: Role
    #: the participant's or client's name; "" for the coordinator (there is one)
    name: str = ""

    def __post_init__(self) -> None:
        problem = _name_problem(self.role, self.name)
        if problem is not None:
            raise ValueError(problem)

    def __str__(self) -> str:
        return (
            self.role.value if self.role is Role.COORDINATOR else f"{self.role.value}:{self.name}"
        )

    @property
    def file_stem(self) -> str:
        """The identity in a file name: ``coordinator``, ``participant-NAME``, ``client-NAME``."""
        return str(self).replace(":", "-", 1)

    @classmethod
    def parse(cls, text: str) -> Identity:
        """ValueError, one line, for anything but ``coordinator``, ``participant:NAME`` or
        ``client:NAME`` with a valid name."""
        role_text, _, name = text.partition(":")
        try:
            role = Role(role_text)
        except ValueError:
            raise ValueError(
                f"{_shown(text)} is not an identity: coordinator, participant:NAME or client:NAME"
            ) from None
        if role is Role.COORDINATOR and text != "coordinator":
            raise ValueError(f"{_shown(text)} is not an identity: the coordinator has no name")
        return cls(role, name)


def _name_problem(role: Role, name: str) -> str | None:
    if role is Role.COORDINATOR:
        return None if name == "" else "the coordinator has no name"
    if role is Role.PARTICIPANT:
        if topology.is_valid_participant_name(name):
            return None
        return f"invalid participant name {_shown(name)}"
    if _CLIENT_NAME.fullmatch(name) is not None:
        return None
    return f"invalid client name {_shown(name)}: letters, digits, '_' or '-', at most 64, no '.'"


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "...")


COORDINATOR = Identity(Role.COORDINATOR)


def participant(name: str) -> Identity:
    return Identity(Role.PARTICIPANT, name)


def client(name: str) -> Identity:
    return Identity(Role.CLIENT, name)


# ---- queues ----------------------------------------------------------------------------------


def queue_owner(queue: str) -> tuple[Role, str] | None:
    """Whose queue ``queue`` is: (role, participant name or client id), or None for a queue
    that is none of the protocol's."""
    if queue == topology.COORDINATOR_QUEUE:
        return Role.COORDINATOR, ""
    for role, prefix in (
        (Role.PARTICIPANT, topology.PARTICIPANT_QUEUE_PREFIX),
        (Role.CLIENT, topology.CLIENT_QUEUE_PREFIX),
    ):
        if queue.startswith(prefix) and len(queue) > len(prefix):
            return role, queue[len(prefix) :]
    return None


def client_owns_queue(name: str, queue: str) -> bool:
    """Whether client ``name``'s key may have replies sent to ``queue``: its own reply queue,
    ``twophase.client.NAME``, or one per instance, ``twophase.client.NAME.ID``."""
    own = topology.client_queue(name)
    return queue == own or queue.startswith(own + ".")


def client_reply_queue(name: str, instance: str) -> str:
    """The reply queue of one instance of client ``name`` (a ``Client``): ``instance`` is unique
    per instance, a uuid4's hex say; the queue is one that client ``name``'s key owns."""
    if _CLIENT_INSTANCE.fullmatch(instance) is None:
        raise ValueError(
            f"invalid client instance id {_shown(instance)}: letters, digits, _ or -, at most 35"
        )
    return topology.client_queue(f"{client(name).name}.{instance}")


# ---- message kinds ---------------------------------------------------------------------------


def kind_of(message_type: type[Any]) -> str:
    """The wire tag of a protocol message type (``prepare``, ``vote``, ...)."""
    tag = message_type.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def protocol_messages(message: Message) -> tuple[Protocol, ...]:
    """The protocol messages one AMQP message carries, in order (an envelope's, or itself)."""
    if isinstance(message, Envelope):
        return tuple(item.message for item in message.messages)
    return (message,)


def kinds_text(message: Message) -> str:
    """The value of ``x-twophase-kinds`` for ``message``: its protocol messages' kinds, sorted,
    each once, comma-separated (an envelope of PREPAREs and COMMITs: ``commit,prepare``)."""
    return _kinds_text(frozenset(map(type, protocol_messages(message))))


def kinds_set(message: Message) -> frozenset[str]:
    """The kinds of ``message``'s protocol messages, as a set."""
    return _kinds_set(frozenset(map(type, protocol_messages(message))))


# an envelope carries one of a few sets of types: each text is made once, not per message
@functools.lru_cache(maxsize=256)
def _kinds_text(types: frozenset[type[Any]]) -> str:
    return ",".join(sorted(kind_of(t) for t in types))


@functools.lru_cache(maxsize=256)
def _kinds_set(types: frozenset[type[Any]]) -> frozenset[str]:
    return frozenset(kind_of(t) for t in types)


# ---- the permission table --------------------------------------------------------------------

#: (sender's role, role of the recipient queue's owner, message type): every row that may be
#: sent; anything else is refused with NOT_PERMITTED
PERMISSIONS: frozenset[tuple[Role, Role, type[Any]]] = frozenset(
    {
        (Role.COORDINATOR, Role.PARTICIPANT, Prepare),
        (Role.COORDINATOR, Role.PARTICIPANT, Commit),
        (Role.COORDINATOR, Role.PARTICIPANT, Abort),
        (Role.COORDINATOR, Role.CLIENT, Outcome),
        (Role.PARTICIPANT, Role.COORDINATOR, Vote),
        (Role.PARTICIPANT, Role.COORDINATOR, Ack),
        (Role.PARTICIPANT, Role.COORDINATOR, Inquire),
        (Role.PARTICIPANT, Role.COORDINATOR, Heartbeat),
        (Role.CLIENT, Role.COORDINATOR, Begin),
        (Role.CLIENT, Role.COORDINATOR, StatusQuery),
    }
)

#: what each role's queue takes (schemas.validation); PERMISSIONS grants nothing outside it
ACCEPTS: dict[Role, tuple[type[Any], ...]] = {
    Role.COORDINATOR: COORDINATOR_ACCEPTS,
    Role.PARTICIPANT: PARTICIPANT_ACCEPTS,
    Role.CLIENT: CLIENT_ACCEPTS,
}


def permission_problem(sender: Identity, queue: str, message: Protocol) -> str | None:
    """Why ``sender`` may not send ``message`` to ``queue`` (one line), or None if it may."""
    return messages_problem(sender, queue, (message,))


def messages_problem(sender: Identity, queue: str, messages: Iterable[Protocol]) -> str | None:
    """:func:`permission_problem` of the first of ``messages`` that has one, or None. The queue
    is parsed once and the table looked up once per message type: an envelope carries
    hundreds."""
    owner = queue_owner(queue)
    if owner is None:
        return f"{_shown(queue)} is no protocol queue"
    recipient, _ = owner
    granted: dict[type[Any], bool] = {}
    for message in messages:
        kind = type(message)
        allowed = granted.get(kind)
        if allowed is None:
            allowed = granted[kind] = (sender.role, recipient, kind) in PERMISSIONS
        if not allowed:
            return (
                f"{sender} may not send a {kind_of(kind)} to {recipient.value} queue "
                f"{_shown(queue)}"
            )
        if sender.role is Role.PARTICIPANT:
            named = getattr(message, "participant", None)
            if named != sender.name:
                return f"{sender} may not send a {kind_of(kind)} for participant {named!r}"
        elif sender.role is Role.CLIENT:
            reply_to = getattr(message, "reply_to", "")
            if not client_owns_queue(sender.name, reply_to):
                return (
                    f"{sender} may not ask for replies in {_shown(reply_to)} "
                    f"(its queues are {topology.client_queue(sender.name)}[.ID])"
                )
    return None
