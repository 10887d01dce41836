"""Start and stop the services as child processes (demo, chaos, bench and tests use it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from runtime import auth, config
from runtime.amqp import AmqpChannel
from runtime.errors import TwophaseError
from schemas import permissions
from schemas.permissions import Identity


class ServiceError(TwophaseError, RuntimeError):
    """A service of the group exited before it consumed, or did not consume in time."""


class Keys:
    """The keys of one group (``twophase keys init`` alike): ``DIR/IDENTITY.key`` and
    ``DIR/keyring``, so that the demo and the bench run with authentication on (issue 14)."""

    def __init__(
        self, directory: Path, participants: Iterable[str], clients: Iterable[str]
    ) -> None:
        self.directory = directory
        self.keyring = directory / "keyring"
        # owner only, as `keys init` makes it: the secret keys are inside
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.keyring.mkdir(mode=0o755, exist_ok=True)
        identities = [permissions.COORDINATOR]
        identities += [permissions.participant(name) for name in participants]
        identities += [permissions.client(name) for name in clients]
        for identity in identities:
            path = auth.secret_key_path(directory, identity)
            # a demo's --data-dir is reused run after run: keep its keys (never overwritten)
            if path.exists():
                key = auth.read_secret_key(path)
            else:
                key = auth.generate(identity)
                auth.write_secret_key(path, key)
            auth.write_public_key(self.keyring, identity, key.public)

    def key_file(self, identity: Identity) -> str:
        return str(auth.secret_key_path(self.directory, identity))

    def client(self, name: str) -> tuple[str, str]:
        """The ``key_file`` and ``keyring`` arguments of a Client named ``name``."""
        return self.key_file(permissions.client(name)), str(self.keyring)


class ServiceGroup:
    def __init__(
        self,
        amqp_url: str,
        workdir: Path,
        *,
        extra_env: dict[str, str] | None = None,
        keys: Keys | None = None,
    ) -> None:
        """``keys``: each service started with its own key and the keyring; None: started with
        ``TWOPHASE_INSECURE=on``, authentication off (the bench's ``--auth off``, the fuzz)."""
        self.amqp_url = amqp_url
        self.workdir = workdir
        self.extra_env = extra_env or {}
        self.keys = keys
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, tuple[list[str], dict[str, str]]] = {}

    def _env(self, **variables: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TWOPHASE_AMQP_URL=self.amqp_url, TWOPHASE_DATA_DIR=str(self.workdir), **self.extra_env
        )
        env.update(variables)
        return env

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.commands[name] = (argv, env)
        log = open(self.workdir / f"{name}.out", "ab")  # noqa: SIM115 - owned by the child
        process = subprocess.Popen(
            [sys.executable, "-m", "twophase", *argv],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.processes[name] = process
        return process

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        argv, env = self.commands[name]
        return self.start(name, argv, env)

    def _key_env(self, identity: Identity) -> dict[str, str]:
        if self.keys is None:
            return {config.INSECURE_VARIABLE: "on"}
        return {
            auth.KEY_FILE_VARIABLE: self.keys.key_file(identity),
            auth.KEYRING_VARIABLE: str(self.keys.keyring),
            # with keys, a broken key wiring must fail, not fall back to running insecure
            config.INSECURE_VARIABLE: "off",
        }

    def start_coordinator(self, name: str = "coordinator", **env: str) -> subprocess.Popen[bytes]:
        variables = self._env(**{**self._key_env(permissions.COORDINATOR), **env})
        return self.start(name, ["coordinator"], variables)

    def start_bank(
        self, name: str, db_url: str, resource: str = "reservation", **env: str
    ) -> subprocess.Popen[bytes]:
        variables = self._env(
            **{
                **self._key_env(permissions.participant(name)),
                "TWOPHASE_PARTICIPANT_NAME": name,
                "TWOPHASE_BANK_DB": db_url,
                "TWOPHASE_BANK_RESOURCE": resource,
                **env,
            }
        )
        return self.start(name, ["participant", "--app", "twophase.bank:from_env"], variables)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(sig)
        process.wait(10)

    def output(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.out"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, queues: Iterable[str], timeout_s: float = 60.0) -> None:
        """Until every queue has a consumer; fail early, with its output, if a service died."""
        pending = list(queues)
        channel = AmqpChannel(self.amqp_url, connection_name="twophase-ready-probe")
        deadline = time.monotonic() + timeout_s
        try:
            while pending:
                for name, process in self.processes.items():
                    if process.poll() is not None:
                        raise ServiceError(
                            f"{name} exited with status {process.returncode}:\n{self.output(name)}"
                        )
                counts = channel.queue_counts(pending[0])
                if counts is not None and counts[1] > 0:
                    pending.pop(0)
                    continue
                if time.monotonic() > deadline:
                    raise ServiceError(f"no consumer on {pending[0]} after {timeout_s:.0f} s")
                time.sleep(0.05)
        finally:
            channel.close()

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> ServiceGroup:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()
