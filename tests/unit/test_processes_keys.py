"""The keys the demo and the bench make for their services and client (twophase.processes.Keys):
each service is started with its own key and the keyring, and the keys load as ``keys init``'s do.
No broker: ServiceGroup.start is replaced by a recorder."""

from __future__ import annotations

import argparse
import stat
import subprocess
from pathlib import Path

import pytest

from runtime import auth
from schemas import permissions
from twophase import bench
from twophase.processes import Keys, ServiceGroup


def recorded(group: ServiceGroup, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, str]]:
    envs: dict[str, dict[str, str]] = {}

    def start(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        envs[name] = env
        return None  # type: ignore[return-value]  # nothing is started here

    monkeypatch.setattr(group, "start", start)
    return envs


def test_each_service_gets_its_own_key_and_the_keyring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(auth.KEY_FILE_VARIABLE, raising=False)
    monkeypatch.delenv(auth.KEYRING_VARIABLE, raising=False)
    keys = Keys(tmp_path / "keys", ["bank-a", "bank-b"], ["web"])
    group = ServiceGroup("amqp://localhost", tmp_path, keys=keys)
    envs = recorded(group, monkeypatch)
    group.start_coordinator()
    group.start_bank("bank-a", "a.db")
    expected = {"coordinator": permissions.COORDINATOR, "bank-a": permissions.participant("bank-a")}
    for name, identity in expected.items():
        env = envs[name]
        assert env[auth.KEYRING_VARIABLE] == str(tmp_path / "keys" / "keyring")
        loaded = auth.load_auth(identity=identity, environ=env)
        assert loaded is not None and loaded.identity == identity
    key_file, keyring = keys.client("web")
    client = auth.load_auth(key_file, keyring, identity=permissions.client("web"))
    assert client is not None
    # secret keys owner only, as `keys init` makes them
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(key_file).stat().st_mode) == 0o600


def test_without_keys_the_environment_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(auth.KEY_FILE_VARIABLE, raising=False)
    monkeypatch.delenv(auth.KEYRING_VARIABLE, raising=False)
    group = ServiceGroup("amqp://localhost", tmp_path)
    envs = recorded(group, monkeypatch)
    group.start_coordinator()
    group.start_bank("bank-a", "a.db")
    for env in envs.values():
        assert auth.KEY_FILE_VARIABLE not in env and auth.KEYRING_VARIABLE not in env


def test_a_reused_directory_keeps_its_keys(tmp_path: Path) -> None:
    """The demo's --data-dir is reused run after run: a secret key is never replaced."""
    first = Keys(tmp_path, ["bank-a"], ["demo"])
    before = auth.read_secret_key(Path(first.key_file(permissions.COORDINATOR))).key_id
    second = Keys(tmp_path, ["bank-a", "bank-b"], ["demo"])
    assert auth.read_secret_key(Path(second.key_file(permissions.COORDINATOR))).key_id == before
    ring = auth.read_keyring(second.keyring)
    assert len(ring.keys) == 4  # coordinator, bank-a, bank-b, client demo: one key each


def test_the_bench_runs_with_authentication_by_default() -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert parser.parse_args([]).auth == "on"
    assert parser.parse_args(["--auth", "off"]).auth == "off"
