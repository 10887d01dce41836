"""``twophase keys``: make, rotate and retire the keys that sign messages (architecture §11).

    twophase keys init DIR --coordinator --participant bank-a --client web
    twophase keys rotate DIR --participant bank-a
    twophase keys retire DIR KEY_ID
    twophase keys cost

``DIR/IDENTITY.key`` are the secret keys (mode 0600), one per process identity; ``DIR/keyring/``
holds every public key and is what ``TWOPHASE_KEYRING`` names. Nothing is ever overwritten: a
secret key in use must not change under its process.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import timeit
from pathlib import Path
from typing import Any

from runtime import auth
from runtime.errors import ConfigurationError
from schemas import permissions
from schemas.messages import Prepare
from schemas.permissions import Identity
from schemas.topology import participant_queue

KEYRING = "keyring"


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="make, rotate and retire the keys that sign messages")
    verbs = keys.add_subparsers(dest="verb", required=True)

    def identities(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "dir", type=Path, help="directory of the secret keys; DIR/keyring the public"
        )
        p.add_argument("--coordinator", action="store_true", help="the coordinator's key")
        p.add_argument(
            "--participant", action="append", default=[], metavar="NAME", help="repeatable"
        )
        p.add_argument("--client", action="append", default=[], metavar="NAME", help="repeatable")

    p = verbs.add_parser("init", help="a secret key per identity, and the keyring of public keys")
    identities(p)
    p.set_defaults(run=_init)

    p = verbs.add_parser(
        "rotate", help="a next key per identity (IDENTITY.next.key), its public key in the keyring"
    )
    identities(p)
    p.set_defaults(run=_rotate)

    p = verbs.add_parser("retire", help="remove a public key from the keyring")
    p.add_argument("dir", type=Path)
    p.add_argument("key_id")
    p.set_defaults(run=_retire)

    p = verbs.add_parser("cost", help="time signing and verifying one AMQP message")
    p.add_argument("--number", type=int, default=2000, help="repetitions per figure (2000)")
    p.set_defaults(run=_cost)


def _chosen(args: argparse.Namespace) -> list[Identity]:
    try:
        chosen = [permissions.COORDINATOR] if args.coordinator else []
        chosen += [permissions.participant(name) for name in args.participant]
        chosen += [permissions.client(name) for name in args.client]
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if not chosen:
        raise ConfigurationError("name at least one of --coordinator, --participant, --client")
    if len(set(chosen)) != len(chosen):
        raise ConfigurationError("an identity is named twice")
    return chosen


def _make(directory: Path, chosen: list[Identity], *, following: bool) -> list[auth.SigningKey]:
    paths = [auth.secret_key_path(directory, i, following=following) for i in chosen]
    existing = [str(path) for path in paths if path.exists() or path.is_symlink()]
    if existing:  # checked for all first, so that a refused run writes nothing
        raise ConfigurationError(f"{', '.join(existing)} exists: a secret key is never replaced")
    keyring = directory / KEYRING
    # owner only: the secret keys are inside; the keyring (public keys) may be copied anywhere
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    keyring.mkdir(mode=0o755, exist_ok=True)
    made = []
    for identity, path in zip(chosen, paths, strict=True):
        key = auth.generate(identity)
        auth.write_secret_key(path, key)
        auth.write_public_key(keyring, identity, key.public)
        print(f"{identity}: key {key.key_id} in {path}")
        made.append(key)
    return made


def _init(args: argparse.Namespace) -> int:
    _make(args.dir, _chosen(args), following=False)
    print(f"keyring (public keys, for every process): {args.dir / KEYRING}")
    print(f"each process: TWOPHASE_KEY_FILE=<its .key file> TWOPHASE_KEYRING={args.dir / KEYRING}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    chosen = _chosen(args)
    missing = [
        str(p) for p in (auth.secret_key_path(args.dir, i) for i in chosen) if not p.exists()
    ]
    if missing:
        raise ConfigurationError(f"{', '.join(missing)}: no such key to rotate (keys init)")
    made = _make(args.dir, chosen, following=True)
    print(
        "next: restart the receivers with the keyring (old and new keys are both accepted), "
        "move each .next.key over its .key and restart its process, then "
        + ", ".join(f"twophase keys retire {args.dir} <old key id of {k.identity}>" for k in made)
    )
    return 0


def _retire(args: argparse.Namespace) -> int:
    keyring = auth.read_keyring(args.dir / KEYRING)
    found = [(identity, key_id) for identity, key_id in keyring.keys if key_id == args.key_id]
    if not found:
        raise ConfigurationError(f"no key {args.key_id!r} in {args.dir / KEYRING}")
    ((identity, key_id),) = found
    secret = auth.secret_key_path(args.dir, identity)
    if secret.exists() and auth.read_secret_key(secret, "key").key_id == key_id:
        raise ConfigurationError(
            f"{key_id} is still the key in {secret}: move the next key over it first"
        )
    if sum(1 for i, _ in keyring.keys if i == identity) == 1:
        raise ConfigurationError(f"{key_id} is the only key of {identity} in the keyring")
    auth.public_key_path(args.dir / KEYRING, identity, key_id).unlink()
    print(f"{identity}: key {key_id} retired; restart the processes that read the keyring")
    return 0


def _cost(args: argparse.Namespace) -> int:
    """Per AMQP message, the best of 5 runs; HMAC-SHA256 over the same bytes for comparison."""
    key = auth.generate(permissions.COORDINATOR)
    keyring = auth.Keyring.of([(key.identity, key.public)])
    secret = os.urandom(32)
    queue = participant_queue("bank-a")
    message = Prepare(
        tx_id="t", participant="bank-a", operation="o", args={}, deadline_ms=1, participants=()
    )
    print(f"{'body':>9}  {'sign':>9}  {'verify':>9}  {'hmac-sha256':>11}   (microseconds)")
    for size in (300, 16_000, 76_800):
        body = os.urandom(size)
        headers = key.sign(body, queue, permissions.kinds_text(message))
        assert isinstance(keyring.verify(body, headers, queue), auth.Verified)

        def best(work: Any) -> float:
            runs = timeit.repeat(work, number=args.number, repeat=5)
            return float(min(runs) / args.number * 1e6)

        sign = best(lambda: key.sign(body, queue, "prepare"))  # noqa: B023 (called at once)
        verify = best(lambda: keyring.verify(body, headers, queue))  # noqa: B023
        mac = best(lambda: hmac.new(secret, body, hashlib.sha256).digest())  # noqa: B023
        print(f"{size:>7} B  {sign:>9.1f}  {verify:>9.1f}  {mac:>11.1f}")
    return 0
