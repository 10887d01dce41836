"""Message authentication, the files (docs/architecture.md §11): secret keys, keyrings,
``load_auth`` and ``twophase keys``. The messages themselves: tests/unit/test_auth.py."""

from __future__ import annotations

import argparse
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runtime import auth
from runtime.auth import Auth, SigningKey, Verified
from runtime.errors import ConfigurationError
from schemas.codec import encode
from schemas.permissions import UNKNOWN_KEY, Identity
from tests.unit.test_auth import (
    BANK_A,
    BANK_B,
    COORDINATOR,
    COORDINATOR_Q,
    KEYS,
    WEB,
    admit,
    message_for,
    reason,
    signed,
)
from twophase import keys_cli

ROOT = Path(__file__).resolve().parents[2]


# ---- key files and loading -----------------------------------------------------------------


def write_keys(directory: Path, *identities: Identity) -> dict[Identity, SigningKey]:
    keyring = directory / "keyring"
    keyring.mkdir(parents=True, exist_ok=True)
    made = {}
    for identity in identities:
        key = auth.generate(identity)
        auth.write_secret_key(auth.secret_key_path(directory, identity), key)
        auth.write_public_key(keyring, identity, key.public)
        made[identity] = key
    return made


def test_key_files_round_trip_and_are_owner_only(tmp_path: Path) -> None:
    made = write_keys(tmp_path, COORDINATOR, BANK_A)
    path = auth.secret_key_path(tmp_path, BANK_A)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = auth.read_secret_key(path)
    assert (key.identity, key.key_id) == (BANK_A, made[BANK_A].key_id)
    keyring = auth.read_keyring(tmp_path / "keyring")
    assert set(keyring.keys) == {(i, k.key_id) for i, k in made.items()}
    body, headers = signed(key, COORDINATOR_Q, message_for("vote", BANK_A))
    assert reason(admit(body, headers, COORDINATOR_Q, keyring)) == "accepted"
    with pytest.raises(FileExistsError):
        auth.write_secret_key(path, made[BANK_A])


def test_a_secret_key_others_may_read_is_refused(tmp_path: Path) -> None:
    write_keys(tmp_path, BANK_A)
    path = auth.secret_key_path(tmp_path, BANK_A)
    for mode in (0o644, 0o640, 0o602):
        path.chmod(mode)
        with pytest.raises(ConfigurationError, match=f"mode {mode:04o}.*chmod 600"):
            auth.read_secret_key(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "no such file"),
        (b"", "is not a twophase secret key"),
        (b'{"kind": "x", "identity": "coordinator", "key_id": "", "secret_key": ""}', "kind"),
        (
            b'{"kind": "twophase-ed25519-secret-key", "identity": "king", "key_id": "",'
            b' "secret_key": ""}',
            "not an identity",
        ),
        (
            b'{"kind": "twophase-ed25519-secret-key", "identity": "coordinator", "key_id": "",'
            b' "secret_key": "AAAA"}',
            "3 bytes, not 32",
        ),
    ],
)
def test_a_bad_secret_key_file_is_one_line(
    tmp_path: Path, content: bytes | None, match: str
) -> None:
    path = tmp_path / "k.key"
    if content is not None:
        path.write_bytes(content)
        path.chmod(0o600)
    with pytest.raises(ConfigurationError, match=match) as caught:
        auth.read_secret_key(path)
    assert "\n" not in str(caught.value) and "TWOPHASE_KEY_FILE" in str(caught.value)


def test_a_key_file_whose_key_id_lies_is_refused(tmp_path: Path) -> None:
    write_keys(tmp_path, BANK_A)
    path = auth.secret_key_path(tmp_path, BANK_A)
    path.write_text(path.read_text().replace('"key_id": "', '"key_id": "0'))
    with pytest.raises(ConfigurationError, match="is not its key's id"):
        auth.read_secret_key(path)
    (pub,) = (tmp_path / "keyring").glob("*.pub")
    pub.write_text(pub.read_text().replace('"key_id": "', '"key_id": "0'))
    with pytest.raises(ConfigurationError, match="is not its key's id"):
        auth.read_keyring(tmp_path / "keyring")


def test_bad_keyrings(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is not a directory"):
        auth.read_keyring(tmp_path / "missing")
    (tmp_path / "README").write_text("not a key")  # ignored: not *.pub
    with pytest.raises(ConfigurationError, match="holds no public key"):
        auth.read_keyring(tmp_path)
    (tmp_path / "x.pub").write_text("{}")
    with pytest.raises(ConfigurationError, match="is not a twophase public key"):
        auth.read_keyring(tmp_path)


def test_one_key_under_two_identities_is_refused(tmp_path: Path) -> None:
    key = KEYS[BANK_A]
    auth.write_public_key(tmp_path, BANK_A, key.public)
    text = auth.public_key_path(tmp_path, BANK_A, key.key_id).read_text()
    (tmp_path / "copy.pub").write_text(text.replace("participant:bank-a", "coordinator"))
    with pytest.raises(ConfigurationError, match="listed as"):
        auth.read_keyring(tmp_path)


def env_for(directory: Path, identity: Identity) -> dict[str, str]:
    return {
        auth.KEY_FILE_VARIABLE: str(auth.secret_key_path(directory, identity)),
        auth.KEYRING_VARIABLE: str(directory / "keyring"),
    }


def test_load_auth_from_the_environment(tmp_path: Path) -> None:
    made = write_keys(tmp_path, COORDINATOR, BANK_A)
    loaded = auth.load_auth(environ=env_for(tmp_path, BANK_A), identity=BANK_A)
    assert isinstance(loaded, Auth)
    assert loaded.identity == BANK_A and loaded.key.key_id == made[BANK_A].key_id
    assert set(loaded.keyring.keys) == {(i, k.key_id) for i, k in made.items()}
    vote = message_for("vote", BANK_A)
    body = encode(vote)
    verified = loaded.verify(body, loaded.sign(body, COORDINATOR_Q, vote), COORDINATOR_Q)
    assert isinstance(verified, Verified)
    assert loaded.authorise(verified, COORDINATOR_Q, vote) is None
    # flags win over the variables
    flags = auth.load_auth(
        str(auth.secret_key_path(tmp_path, COORDINATOR)), str(tmp_path / "keyring"), environ={}
    )
    assert flags is not None and flags.identity == COORDINATOR


def test_load_auth_refusals(tmp_path: Path) -> None:
    write_keys(tmp_path, COORDINATOR, BANK_A)
    env = env_for(tmp_path, BANK_A)
    cases: list[tuple[dict[str, str], dict[str, Any], str]] = [
        ({}, {}, "no key: set TWOPHASE_KEY_FILE and TWOPHASE_KEYRING.*--insecure"),
        ({auth.KEY_FILE_VARIABLE: env[auth.KEY_FILE_VARIABLE]}, {}, "TWOPHASE_KEYRING is not set"),
        ({auth.KEYRING_VARIABLE: env[auth.KEYRING_VARIABLE]}, {}, "TWOPHASE_KEY_FILE is not set"),
        (env, {"identity": BANK_B}, "is the key of participant:bank-a, not of participant:bank-b"),
        ({**env, auth.KEY_FILE_VARIABLE: str(tmp_path / "nope.key")}, {}, "no such file"),
    ]
    for environ, options, match in cases:
        with pytest.raises(ConfigurationError, match=match):
            auth.load_auth(environ=environ, **options)


def test_a_participant_whose_keyring_lacks_the_coordinator_does_not_start(tmp_path: Path) -> None:
    write_keys(tmp_path, BANK_A)
    with pytest.raises(ConfigurationError, match="holds no key of the coordinator"):
        auth.load_auth(environ=env_for(tmp_path, BANK_A))


def test_insecure_is_none_and_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(auth, "_warned_insecure", False)
    with caplog.at_level(logging.WARNING, logger="runtime.auth"):
        assert auth.load_auth(environ={}, insecure=True) is None
        assert auth.load_auth(environ={}, insecure=True) is None
    warnings = [r for r in caplog.records if "authentication is off" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


# ---- twophase keys ---------------------------------------------------------------------------


def keys(*argv: str | Path) -> int:
    """``twophase keys ...`` as the command line runs it (exit 2 for a ConfigurationError)."""
    parser = argparse.ArgumentParser(prog="twophase")
    keys_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    try:
        code: int = args.run(args)
    except ConfigurationError as exc:
        print(f"twophase keys: error: {exc}", file=sys.stderr)
        return 2
    return code


def test_keys_init_end_to_end_through_the_command(tmp_path: Path) -> None:
    """The real entry point, in a process of its own."""
    directory = tmp_path / "keys"
    argv = ["init", str(directory), "--coordinator", "--participant", "bank-a"]
    argv += ["--participant", "bank-b", "--client", "web"]
    command = [sys.executable, "-m", "twophase", "keys", *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "participant:bank-b: key" in done.stdout
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for identity in (COORDINATOR, BANK_A, BANK_B, WEB):
        path = auth.secret_key_path(directory, identity)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        loaded = auth.load_auth(environ=env_for(directory, identity), identity=identity)
        assert loaded is not None
        assert loaded.keyring.identities() == {COORDINATOR, BANK_A, BANK_B, WEB}
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "is never replaced" in again.stderr


def test_keys_init_refuses_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys("keys", "init", tmp_path, "--participant", "bank-a") == 0
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert keys("keys", "init", tmp_path, "--coordinator", "--participant", "bank-a") == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert keys("keys", "init", tmp_path) == 2
    assert keys("keys", "init", tmp_path, "--client", "web", "--client", "web") == 2
    assert keys("keys", "init", tmp_path, "--client", "a.b") == 2
    assert "invalid client name" in capsys.readouterr().err


def test_keys_rotate_then_retire(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keys("keys", "init", tmp_path, "--coordinator", "--participant", "bank-a") == 0
    assert keys("keys", "rotate", tmp_path, "--participant", "bank-b") == 2  # never made
    path = auth.secret_key_path(tmp_path, BANK_A)
    old = auth.read_secret_key(path)
    assert keys("keys", "rotate", tmp_path, "--participant", "bank-a") == 0
    following = auth.secret_key_path(tmp_path, BANK_A, following=True)
    new = auth.read_secret_key(following)
    assert stat.S_IMODE(following.stat().st_mode) == 0o600
    assert keys("keys", "rotate", tmp_path, "--participant", "bank-a") == 2  # one at a time

    vote = message_for("vote", BANK_A)
    during = auth.read_keyring(tmp_path / "keyring")
    for key in (old, new):
        body, headers = signed(key, COORDINATOR_Q, vote)
        assert reason(admit(body, headers, COORDINATOR_Q, during)) == "accepted"

    capsys.readouterr()
    assert keys("keys", "retire", tmp_path, old.key_id) == 2  # still the key in use
    assert "move the next key over it first" in capsys.readouterr().err
    following.replace(path)
    assert keys("keys", "retire", tmp_path, new.key_id) == 2  # in use now
    assert keys("keys", "retire", tmp_path, "0000000000000000") == 2
    assert keys("keys", "retire", tmp_path, old.key_id) == 0
    after = auth.read_keyring(tmp_path / "keyring")
    body, headers = signed(old, COORDINATOR_Q, vote)
    assert reason(admit(body, headers, COORDINATOR_Q, after)) == UNKNOWN_KEY
    body, headers = signed(new, COORDINATOR_Q, vote)
    assert reason(admit(body, headers, COORDINATOR_Q, after)) == "accepted"


def test_keys_retire_keeps_an_identitys_last_key(tmp_path: Path) -> None:
    assert keys("keys", "init", tmp_path, "--participant", "bank-a") == 0
    key = auth.read_secret_key(auth.secret_key_path(tmp_path, BANK_A))
    auth.secret_key_path(tmp_path, BANK_A).unlink()  # not in use here any more
    assert keys("keys", "retire", tmp_path, key.key_id) == 2


def test_keys_cost_prints_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert keys("keys", "cost", "--number", "3") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "verify" in lines[0] and len(lines) == 4
