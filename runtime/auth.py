"""Message authentication: Ed25519 keys, key files, the keyring, signing and verifying.

docs/architecture.md §11. A sender signs once per AMQP message (:meth:`Auth.sign`); the receiver
verifies the raw body before decoding it (:meth:`Auth.verify`), then, once decoded, checks that the
sender may send what it signed (:meth:`Auth.authorise`, with the table of
:mod:`schemas.permissions`). Pure but for the key files: no broker, no clock.

Files: a secret key is one JSON object, mode 0600, named by ``TWOPHASE_KEY_FILE``; the keyring is a
directory of public keys, one JSON object per ``*.pub`` file, named by ``TWOPHASE_KEYRING``. A
keyring may hold several keys of one identity (during a rotation both are accepted).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import logging
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from runtime.errors import ConfigurationError
from schemas.messages import Message
from schemas.permissions import (
    BAD_SIGNATURE,
    KEY_ID_HEADER,
    KINDS_HEADER,
    NOT_PERMITTED,
    SENDER_HEADER,
    SIGNATURE_HEADER,
    UNKNOWN_KEY,
    Identity,
    Role,
    kinds_set,
    kinds_text,
    messages_problem,
    protocol_messages,
)

log = logging.getLogger(__name__)

KEY_FILE_VARIABLE = "TWOPHASE_KEY_FILE"
KEYRING_VARIABLE = "TWOPHASE_KEYRING"

#: starts every signed byte string: a signature made for anything else (another protocol, a
#: later version of this one) is never valid here
_DOMAIN = b"twophase-auth-v1\x00"
_SECRET_KIND = "twophase-ed25519-secret-key"
_PUBLIC_KIND = "twophase-ed25519-public-key"
_SIGNATURE_BYTES = 64


# ---- signing and verifying -----------------------------------------------------------------


def key_id_of(public: Ed25519PublicKey) -> str:
    """A key's id: the first 16 hex digits of the SHA-256 of its public half. Derived, not
    chosen, so that a keyring file naming the wrong key is caught when it is read."""
    return hashlib.sha256(_raw_public(public)).hexdigest()[:16]


def signed_data(sender: str, key_id: str, queue: str, kinds: str, body: bytes) -> bytes:
    """What a signature covers. Each text is length-prefixed, so that no two different tuples
    give the same bytes; the body is hashed first, so that a large envelope costs one pass of
    SHA-256 rather than Ed25519's two passes over it."""
    return _signed_prefix(sender, key_id, queue, kinds) + hashlib.sha256(body).digest()


# a process signs and verifies with a handful of (sender, key, queue, kinds): made once each
@functools.lru_cache(maxsize=1024)
def _signed_prefix(sender: str, key_id: str, queue: str, kinds: str) -> bytes:
    parts = [_DOMAIN]
    for text in (sender, key_id, queue, kinds):
        raw = text.encode("utf-8")
        parts += [struct.pack(">I", len(raw)), raw]
    return b"".join(parts)


@dataclasses.dataclass(frozen=True)
class SigningKey:
    """One identity's secret key."""

    identity: Identity
    key_id: str
    secret: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.secret.public_key()

    def sign(self, body: bytes, queue: str, kinds: str) -> dict[str, str]:
        """The authentication headers of ``body`` published to ``queue``, carrying ``kinds``
        (see :func:`schemas.permissions.kinds_text`)."""
        sender = str(self.identity)
        signature = self.secret.sign(signed_data(sender, self.key_id, queue, kinds, body))
        return {
            SENDER_HEADER: sender,
            KEY_ID_HEADER: self.key_id,
            KINDS_HEADER: kinds,
            SIGNATURE_HEADER: base64.b64encode(signature).decode("ascii"),
        }


def generate(identity: Identity) -> SigningKey:
    secret = Ed25519PrivateKey.generate()
    return SigningKey(identity, key_id_of(secret.public_key()), secret)


@dataclasses.dataclass(frozen=True)
class Verified:
    """A message whose signature holds: who sent it, with which key, claiming which kinds."""

    sender: Identity
    key_id: str
    kinds: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a message is refused: ``reason`` is one of ``bad signature``, ``unknown key`` and
    ``sender may not send this`` (schemas.permissions); ``detail`` says more, for the log."""

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class Keyring:
    """The public keys a process accepts, by (identity, key id)."""

    def __init__(self, keys: Mapping[tuple[Identity, str], Ed25519PublicKey]) -> None:
        self.keys: Mapping[tuple[Identity, str], Ed25519PublicKey] = dict(keys)
        # by the sender header's text: a message is looked up without parsing an identity
        self._by_text = {(str(i), key_id): (i, k) for (i, key_id), k in self.keys.items()}

    @classmethod
    def of(cls, keys: Iterable[tuple[Identity, Ed25519PublicKey]]) -> Keyring:
        return cls({(identity, key_id_of(public)): public for identity, public in keys})

    def identities(self) -> set[Identity]:
        return {identity for identity, _ in self.keys}

    def verify(self, body: bytes, headers: Mapping[str, object], queue: str) -> Verified | Refusal:
        """Whether ``body``, consumed from ``queue`` with ``headers``, was signed by a key of
        this keyring for this queue. Reads the headers only: call it before decoding."""
        values: dict[str, str] = {}
        for name in (SENDER_HEADER, KEY_ID_HEADER, KINDS_HEADER, SIGNATURE_HEADER):
            value = headers.get(name)
            if not isinstance(value, str) or not value:
                return Refusal(BAD_SIGNATURE, f"no {name} header")
            values[name] = value
        sender_text, key_id = values[SENDER_HEADER], values[KEY_ID_HEADER]
        found = self._by_text.get((sender_text, key_id))
        if found is None:
            return Refusal(
                UNKNOWN_KEY, f"no key {key_id[:40]!r} of {sender_text[:120]!r} in the keyring"
            )
        sender, public = found
        try:
            signature = base64.b64decode(values[SIGNATURE_HEADER], validate=True)
        except (binascii.Error, ValueError):
            return Refusal(BAD_SIGNATURE, f"{SIGNATURE_HEADER} is not base64")
        if len(signature) != _SIGNATURE_BYTES:
            return Refusal(BAD_SIGNATURE, f"{SIGNATURE_HEADER} is not an Ed25519 signature")
        kinds = values[KINDS_HEADER]
        try:
            public.verify(signature, signed_data(sender_text, key_id, queue, kinds, body))
        except InvalidSignature:
            return Refusal(
                BAD_SIGNATURE,
                f"the signature of {sender}'s key {key_id} does not match "
                f"(body, sender, key id, kinds or queue {queue[:80]!r} changed)",
            )
        return Verified(sender, key_id, frozenset(kinds.split(",")))


def authorise(verified: Verified, queue: str, message: Message) -> Refusal | None:
    """None if the verified sender may send the decoded ``message`` to ``queue``: the kinds it
    carries are exactly the signed ones, and each of its protocol messages is one the sender may
    send there (schemas.permissions.permission_problem). Else why not."""
    if kinds_set(message) != verified.kinds:
        signed = ",".join(sorted(verified.kinds))
        return Refusal(NOT_PERMITTED, f"signed as {signed!r} but carries {kinds_text(message)!r}")
    problem = messages_problem(verified.sender, queue, protocol_messages(message))
    return None if problem is None else Refusal(NOT_PERMITTED, problem)


@dataclasses.dataclass(frozen=True)
class Auth:
    """A process's own key and the keys of the peers it accepts messages from."""

    key: SigningKey
    keyring: Keyring

    @property
    def identity(self) -> Identity:
        return self.key.identity

    def sign(self, body: bytes, queue: str, message: Message) -> dict[str, str]:
        """The headers to publish ``body`` (``message`` encoded) to ``queue`` with."""
        return self.key.sign(body, queue, kinds_text(message))

    def verify(self, body: bytes, headers: Mapping[str, object], queue: str) -> Verified | Refusal:
        return self.keyring.verify(body, headers, queue)

    def authorise(self, verified: Verified, queue: str, message: Message) -> Refusal | None:
        return authorise(verified, queue, message)


# ---- key files -----------------------------------------------------------------------------


class _SecretKeyFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: str
    identity: str
    key_id: str
    secret_key: str


class _PublicKeyFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: str
    identity: str
    key_id: str
    public_key: str


def secret_key_path(directory: Path, identity: Identity, *, following: bool = False) -> Path:
    """``DIR/participant-bank-a.key``, or ``.next.key`` for the key a rotation will move in."""
    return directory / f"{identity.file_stem}{'.next' if following else ''}.key"


def public_key_path(keyring: Path, identity: Identity, key_id: str) -> Path:
    return keyring / f"{identity.file_stem}.{key_id}.pub"


def write_secret_key(path: Path, key: SigningKey) -> None:
    """Write ``key`` to a new file readable by its owner only; FileExistsError if ``path``
    exists (a secret key is never overwritten: the process using it would lose its identity)."""
    raw = key.secret.private_bytes_raw()
    document = _SecretKeyFile(_SECRET_KIND, str(key.identity), key.key_id, _b64(raw))
    # created 0600 (O_EXCL: never through an existing file or link), not chmod-ed afterwards,
    # so that the secret is never readable by others, not even for a moment
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(document)) + b"\n")


def write_public_key(keyring: Path, identity: Identity, public: Ed25519PublicKey) -> Path:
    key_id = key_id_of(public)
    document = _PublicKeyFile(_PUBLIC_KIND, str(identity), key_id, _b64(_raw_public(public)))
    path = public_key_path(keyring, identity, key_id)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(document)) + b"\n")
    return path


def read_secret_key(path: Path, what: str = KEY_FILE_VARIABLE) -> SigningKey:
    """The key in ``path``; ConfigurationError, one line starting with ``what``, for a file that
    is missing, readable by others or not a twophase secret key."""
    where = f"{what} {str(path)!r}"
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"{where}: no such file") from None
    except OSError as exc:
        raise ConfigurationError(f"{where}: cannot read it ({exc.strerror})") from None
    if mode & 0o077:
        raise ConfigurationError(
            f"{where} may be read or written by others (mode {stat.S_IMODE(mode):04o}): "
            f"chmod 600 {path}"
        )
    try:
        document = msgspec.json.decode(raw, type=_SecretKeyFile)
        if document.kind != _SECRET_KIND:
            raise ValueError(f"kind is {document.kind!r}, not {_SECRET_KIND!r}")
        identity = Identity.parse(document.identity)
        secret = Ed25519PrivateKey.from_private_bytes(_unb64(document.secret_key, 32))
    except (msgspec.DecodeError, ValueError) as exc:
        raise ConfigurationError(f"{where} is not a twophase secret key: {exc}") from None
    key_id = key_id_of(secret.public_key())
    if document.key_id != key_id:
        raise ConfigurationError(
            f"{where}: key_id {document.key_id!r} is not its key's id ({key_id})"
        )
    return SigningKey(identity, key_id, secret)


def read_public_key(path: Path) -> tuple[Identity, Ed25519PublicKey]:
    """The identity and key in a keyring file; ConfigurationError, one line, if it is not one."""
    where = f"{KEYRING_VARIABLE}: {str(path)!r}"
    try:
        document = msgspec.json.decode(path.read_bytes(), type=_PublicKeyFile)
        if document.kind != _PUBLIC_KIND:
            raise ValueError(f"kind is {document.kind!r}, not {_PUBLIC_KIND!r}")
        identity = Identity.parse(document.identity)
        public = Ed25519PublicKey.from_public_bytes(_unb64(document.public_key, 32))
    except OSError as exc:
        raise ConfigurationError(f"{where}: cannot read it ({exc.strerror})") from None
    except (msgspec.DecodeError, ValueError) as exc:
        raise ConfigurationError(f"{where} is not a twophase public key: {exc}") from None
    if document.key_id != key_id_of(public):
        raise ConfigurationError(
            f"{where}: key_id {document.key_id!r} is not its key's id ({key_id_of(public)})"
        )
    return identity, public


def read_keyring(directory: Path) -> Keyring:
    """Every ``*.pub`` file in ``directory`` (other files are ignored); ConfigurationError for a
    directory that is missing or holds no key, or for a file that is not a public key."""
    where = f"{KEYRING_VARIABLE} {str(directory)!r}"
    if not directory.is_dir():
        raise ConfigurationError(f"{where} is not a directory")
    paths = sorted(directory.glob("*.pub"))
    if not paths:
        raise ConfigurationError(f"{where} holds no public key (*.pub): see `twophase keys init`")
    owners: dict[str, Identity] = {}
    keys: list[tuple[Identity, Ed25519PublicKey]] = []
    for path in paths:
        identity, public = read_public_key(path)
        key_id = key_id_of(public)
        if owners.setdefault(key_id, identity) != identity:
            # whoever holds its secret would be both: refuse rather than pick one
            raise ConfigurationError(
                f"{where}: key {key_id} is listed as {owners[key_id]} and as {identity}"
            )
        keys.append((identity, public))
    return Keyring.of(keys)


_warned_insecure = False


def load_auth(
    key_file: str | None = None,
    keyring: str | None = None,
    *,
    identity: Identity | None = None,
    insecure: bool = False,
    environ: Mapping[str, str] | None = None,
) -> Auth | None:
    """This process's key (``key_file``, else ``TWOPHASE_KEY_FILE``) and the peers' public keys
    (``keyring``, else ``TWOPHASE_KEYRING``).

    Neither set: None if ``insecure`` (authentication off, said once at WARNING), else
    ConfigurationError. ``identity``: the identity this process must have (a participant's
    name, say). ConfigurationError, one line, for anything that cannot work.
    """
    global _warned_insecure
    env: Mapping[str, str] = os.environ if environ is None else environ
    key_text = key_file or env.get(KEY_FILE_VARIABLE, "")
    keyring_text = keyring or env.get(KEYRING_VARIABLE, "")
    if not key_text and not keyring_text:
        if not insecure:
            raise ConfigurationError(
                f"no key: set {KEY_FILE_VARIABLE} and {KEYRING_VARIABLE} (see `twophase keys "
                "init`), or start with --insecure to run without authentication"
            )
        if not _warned_insecure:
            _warned_insecure = True
            log.warning("authentication is off (--insecure): any broker account can forge messages")
        return None
    if not key_text or not keyring_text:
        missing = KEY_FILE_VARIABLE if not key_text else KEYRING_VARIABLE
        raise ConfigurationError(f"{missing} is not set (authentication needs both)")
    key = read_secret_key(Path(key_text))
    if identity is not None and key.identity != identity:
        raise ConfigurationError(
            f"{KEY_FILE_VARIABLE} {key_text!r} is the key of {key.identity}, not of {identity}"
        )
    ring = read_keyring(Path(keyring_text))
    # a participant or client whose keyring lacks the coordinator would refuse every PREPARE or
    # Outcome; that is a setting that cannot work, said at start rather than per message
    if key.identity.role is not Role.COORDINATOR and not any(
        i.role is Role.COORDINATOR for i in ring.identities()
    ):
        raise ConfigurationError(
            f"{KEYRING_VARIABLE} {keyring_text!r} holds no key of the coordinator"
        )
    return Auth(key, ring)


def _raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("the key is not base64") from None
    if len(raw) != size:
        raise ValueError(f"the key is {len(raw)} bytes, not {size}")
    return raw
