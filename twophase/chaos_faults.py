"""The faults of ``twophase chaos``: SIGKILL, armed crash points, connection kicks, broker restart.

:class:`Broker` drives ``rabbitmqctl`` (and ``rabbitmq-server``) for one virtual host;
:class:`FaultInjector` runs in a thread of its own and works through a shuffled plan of faults,
each one started when the load has submitted its share of the transfers (so that the faults are
spread over the whole load whatever its throughput). Between faults it watches the services: one
that exits without having been killed or sent to a crash point is restarted and reported.

Only processes this run started are ever killed, always by PID (through :class:`ServiceGroup`).
The broker is stopped with ``rabbitmqctl stop`` and started again with ``rabbitmq-server
-detached`` + ``rabbitmqctl await_startup``; the start is in a ``finally``, so the broker comes
back whatever happens while it is down.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from runtime.crashpoints import ENV as CRASHPOINTS_ENV
from runtime.crashpoints import NAMES as CRASHPOINT_NAMES
from runtime.errors import TwophaseError
from twophase.processes import ServiceGroup

#: the exit status of a process that reached an armed crash point (see runtime.crashpoints)
CRASH_EXIT_STATUS = 86

_CONNECTION_NAME = re.compile(r'\{"connection_name","([^"]*)"\}')


class BrokerError(TwophaseError, RuntimeError):
    """The RabbitMQ node under test could not be stopped, started or asked."""


def vhost_of(amqp_url: str) -> str:
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


class Broker:
    """``rabbitmqctl`` for the run's virtual host, and a full stop/start of the node."""

    def __init__(self, amqp_url: str) -> None:
        self.vhost = vhost_of(amqp_url)
        parts = urlsplit(amqp_url)
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 5672
        self.stopped_by_us = False

    @staticmethod
    def available() -> bool:
        return shutil.which("rabbitmqctl") is not None

    @staticmethod
    def ctl(*args: str, timeout: float = 60.0, check: bool = True) -> str:
        result = subprocess.run(
            ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise BrokerError(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[:500]}"
            )
        return result.stdout

    # ---- connections ---------------------------------------------------------------------

    def connections(self) -> list[tuple[str, str]]:
        """(pid, connection_name) of every connection to our virtual host."""
        out = self.ctl(
            "list_connections", "pid", "client_properties", "vhost", "-q", "--no-table-headers"
        )
        found = []
        for line in out.splitlines():
            columns = line.split("\t")
            if len(columns) < 3 or columns[-1] != self.vhost:
                continue
            name = _CONNECTION_NAME.search(columns[1])
            found.append((columns[0], name.group(1) if name else ""))
        return found

    def kick(self, pid: str, reason: str = "twophase chaos: connection kicked") -> bool:
        out = self.ctl("close_connection", pid, reason, check=False)
        return "Closing connection" in out

    # ---- the node ------------------------------------------------------------------------

    def os_pid(self) -> int | None:
        out = self.ctl("status", timeout=30, check=False)
        found = re.search(r"OS PID: (\d+)", out)
        return int(found.group(1)) if found else None

    def port_open(self) -> bool:
        import socket

        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the whole node (the Erlang VM exits) and wait until it is gone."""
        pid = self.os_pid()
        self.stopped_by_us = True
        self.ctl("stop", timeout=120)
        deadline = time.monotonic() + 60
        while (pid is not None and Path(f"/proc/{pid}").exists()) or self.port_open():
            if time.monotonic() > deadline:
                raise BrokerError("the RabbitMQ node did not stop within 60 s")
            time.sleep(0.2)

    def start(self) -> None:
        """``rabbitmq-server -detached``, then ``rabbitmqctl await_startup`` (a few tries)."""
        last = ""
        for _attempt in range(3):
            if not self.port_open():
                subprocess.run(
                    ["rabbitmq-server", "-detached"],
                    capture_output=True,
                    timeout=120,
                    stdin=subprocess.DEVNULL,
                )
            result = subprocess.run(
                ["rabbitmqctl", "await_startup", "--timeout", "90"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            deadline = time.monotonic() + 30
            while result.returncode == 0 and not self.port_open():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            if result.returncode == 0 and self.port_open():
                self.stopped_by_us = False
                return
            last = (result.stderr or result.stdout).strip()[:500]
            time.sleep(2)
        raise BrokerError(f"RabbitMQ did not start again: {last}")

    def restart(self, down_s: float) -> float:
        """Stop the node, stay down ``down_s`` seconds, start it: the start is always done."""
        started = time.monotonic()
        try:
            self.stop()
            time.sleep(down_s)
        finally:
            self.start()
        return time.monotonic() - started

    def ensure_running(self) -> None:
        """Safety net for a ``finally``: bring the node back if this run stopped it."""
        if self.stopped_by_us or not self.port_open():
            self.start()


# ---- the fault plan -------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    kind: str  # kill | crashpoint | kick | broker_restart
    target: str = ""
    crashpoint: str = ""


@dataclass
class FaultLog:
    """What the injector did, for the summary and for the recovery time."""

    counts: Counter[str] = field(default_factory=Counter)
    events: list[str] = field(default_factory=list)
    crashpoints_fired: list[str] = field(default_factory=list)
    crashpoints_missed: list[str] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    broker_restart_s: float | None = None
    last_restart: float = 0.0  # time.monotonic() of the last (re)start of anything
    errors: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")


def plan_faults(
    rng: random.Random,
    services: list[str],
    banks: list[str],
    *,
    kills: int,
    kicks: int,
    crashpoints: bool,
    broker_restart: bool,
) -> list[Fault]:
    faults = [Fault("kill", rng.choice(services)) for _ in range(kills)]
    if crashpoints:
        offset = rng.randrange(len(banks))
        participant_points = [n for n in CRASHPOINT_NAMES if n.startswith("participant.")]
        for name in CRASHPOINT_NAMES:
            if name.startswith("coordinator."):
                target = "coordinator"
            else:
                target = banks[(offset + participant_points.index(name)) % len(banks)]
            faults.append(Fault("crashpoint", target, name))
    faults += [Fault("kick") for _ in range(kicks)]
    rng.shuffle(faults)
    if broker_restart:
        # somewhere in the middle, so that there is load before and after it
        middle = len(faults) // 2
        position = rng.randint(max(0, middle - len(faults) // 4), middle + len(faults) // 4)
        faults.insert(position, Fault("broker_restart"))
    return faults


class FaultInjector(threading.Thread):
    """Runs the plan; fault ``i`` starts once ``progress()`` reached ``thresholds[i]``.

    The load calls :meth:`gate` before each submission, so that it does not run ahead of a fault
    that is still busy (a kill and restart, the broker restart); it does not wait while an armed
    crash point needs traffic to be reached.
    """

    def __init__(
        self,
        services: ServiceGroup,
        broker: Broker,
        plan: list[Fault],
        thresholds: list[int],
        progress: Callable[[], int],
        rng: random.Random,
        *,
        crash_probability: float = 0.25,
        crash_wait_s: float = 15.0,
        crash_loops: bool = True,
    ) -> None:
        super().__init__(name="twophase-chaos-faults", daemon=True)
        self.services = services
        self.broker = broker
        self.plan = plan
        self.thresholds = thresholds
        self.progress = progress
        self.rng = rng
        self.crash_probability = crash_probability
        self.crash_wait_s = crash_wait_s
        self.crash_loops = crash_loops
        self.base = dict(services.commands)  # name -> (argv, env) without crash points
        self.log = FaultLog(last_restart=time.monotonic())
        self.started_faults = 0
        self.changed = threading.Condition()
        self._halt = threading.Event()
        self.plan_done = threading.Event()
        #: an armed crash point is waiting for traffic: the load must not wait for the faults
        self.feeding = False
        self._down: set[str] = set()  # services this thread is restarting on purpose

    # ---- control from the load ---------------------------------------------------------------

    def stop(self) -> None:
        self._halt.set()
        with self.changed:
            self.changed.notify_all()

    def gate(self, submitted: int, timeout_s: float = 60.0) -> None:
        """Called by the load before submitting: wait until the faults due by now have started."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while (
                self.started_faults < len(self.plan)
                and self.thresholds[self.started_faults] < submitted
                and not self.feeding
                and self.is_alive()
                and not self._halt.is_set()
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.changed.wait(min(remaining, 0.2))

    # ---- the thread ----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            for index, fault in enumerate(self.plan):
                while self.progress() < self.thresholds[index]:
                    if self._halt.is_set():
                        return
                    self.watch()
                    time.sleep(0.05)
                self._sleep(self.rng.uniform(0.0, 0.3))  # not in step with the batches
                with self.changed:
                    self.started_faults = index + 1
                    self.changed.notify_all()
                self.inject(fault)
            self.plan_done.set()
            while not self._halt.is_set():
                self.watch()
                time.sleep(0.1)
        except Exception as exc:  # reported as a failed check, never swallowed
            self.log.errors.append(f"fault injector failed: {type(exc).__name__}: {exc}")
            self.log.note(f"injector failed: {exc!r}")
        finally:
            self.plan_done.set()
            with self.changed:
                self.started_faults = len(self.plan)
                self.changed.notify_all()

    def _sleep(self, seconds: float) -> None:
        self._halt.wait(seconds)

    def inject(self, fault: Fault) -> None:
        if fault.kind == "kill":
            self.kill_and_restart(fault.target)
        elif fault.kind == "crashpoint":
            self.crashpoint_round(fault.target, fault.crashpoint)
        elif fault.kind == "kick":
            self.kick()
        elif fault.kind == "broker_restart":
            self.restart_broker()
        else:  # pragma: no cover - plan_faults makes only these
            raise ValueError(fault.kind)

    # ---- the faults ------------------------------------------------------------------------

    def kill_and_restart(self, name: str) -> None:
        self._down.add(name)
        try:
            self.services.kill(name, signal.SIGKILL)
            self.log.counts["sigkill"] += 1
            self.log.counts[f"sigkill:{name}"] += 1
            self.log.note(f"SIGKILL {name}")
            self._sleep(self.rng.uniform(0.2, 1.5))
            self.start_service(name, "restart after SIGKILL")
        finally:
            self._down.discard(name)

    def crashpoint_round(self, name: str, point: str) -> None:
        """Restart ``name`` with ``point`` armed; once it exits there, restart it without."""
        self._down.add(name)
        try:
            self.services.kill(name, signal.SIGKILL)
            self.log.note(f"SIGKILL {name} to arm {point}")
            spec = f"{point}:{self.crash_probability}"
            for _attempt in range(3):  # again only if it could not even start
                self.start_service(
                    name, f"restart with {CRASHPOINTS_ENV}={spec}", {CRASHPOINTS_ENV: spec}
                )
                outcome = self._await_crash(name, point)
                if outcome != "no start":
                    break
            if outcome != "crashed":
                self.log.crashpoints_missed.append(point)
            elif self.crash_loops:
                # A crash loop: the restarted process crashes at the same point once more, in
                # the middle of redoing what the first crash interrupted (redelivered messages,
                # recovered in-doubt branches), before it comes up for good.
                again = f"{point}:1.0"
                self.start_service(
                    name, f"restart with {CRASHPOINTS_ENV}={again}", {CRASHPOINTS_ENV: again}
                )
                self._await_crash(name, point, again=True)
            self._sleep(self.rng.uniform(0.1, 1.0))
            self.start_service(name, "restart without crash points")
        finally:
            self._down.discard(name)

    def _await_crash(self, name: str, point: str, *, again: bool = False) -> str:
        """Wait (feeding the load) for the armed process to exit: crashed | missed | no start."""
        self.log.counts["crashpoint_armed"] += 1
        process = self.services.processes[name]
        deadline = time.monotonic() + self.crash_wait_s
        self.feeding = True
        try:
            while process.poll() is None and time.monotonic() < deadline:
                if self._halt.is_set():
                    break
                time.sleep(0.02)
        finally:
            self.feeding = False
        code = process.poll()
        if code == CRASH_EXIT_STATUS:
            self.log.counts["crashpoint_crash"] += 1
            if not again:
                self.log.crashpoints_fired.append(point)
            self.log.note(f"{name} exited at crash point {point}")
            return "crashed"
        if code is None:
            self.services.kill(name, signal.SIGKILL)
            self.log.note(f"{name} did not reach {point} in {self.crash_wait_s:.0f} s: killed")
            return "missed"
        started = note_exit(self.services, self.log, name, code)
        return "missed" if started or self._halt.is_set() else "no start"

    def kick(self) -> None:
        ours = [(pid, n) for pid, n in self.broker.connections() if n.startswith("twophase-")]
        if not ours:
            self.log.note("kick: no connection of ours to close")
            return
        for pid, connection_name in self.rng.sample(ours, k=min(len(ours), self.rng.randint(1, 2))):
            if self.broker.kick(pid):
                self.log.counts["connection_kick"] += 1
                self.log.note(f"closed connection {connection_name} ({pid})")

    def restart_broker(self) -> None:
        self.log.note("broker: rabbitmqctl stop")
        took = self.broker.restart(self.rng.uniform(1.0, 3.0))
        self.log.counts["broker_restart"] += 1
        self.log.broker_restart_s = round(took, 2)
        self.log.last_restart = time.monotonic()
        self.log.note(f"broker: started again ({took:.1f} s after the stop)")

    # ---- services ------------------------------------------------------------------------

    def start_service(self, name: str, why: str, extra_env: dict[str, str] | None = None) -> None:
        argv, env = self.base[name]
        env = {k: v for k, v in env.items() if k != CRASHPOINTS_ENV}
        env.update(extra_env or {})
        with open(self.services.workdir / f"{name}.out", "a") as out:
            out.write(f"=== twophase chaos: {why} at {time.strftime('%H:%M:%S')} ===\n")
        self.services.start(name, argv, env)
        if extra_env is None:  # later restarts (ServiceGroup.restart) run it without them
            self.services.commands[name] = self.base[name]
        self.log.last_restart = time.monotonic()

    def watch(self) -> None:
        """Restart (and report) a service that died without being killed or armed."""
        for name, process in list(self.services.processes.items()):
            if name in self._down:
                continue
            code = process.poll()
            if code is not None:
                note_exit(self.services, self.log, name, code)
                self.start_service(name, f"restart after an unexpected exit ({code})")


def note_exit(services: ServiceGroup, log: FaultLog, name: str, code: int | None) -> bool:
    """Record a service's exit that nobody asked for; False if it never got started.

    A service (re)started while the broker is down exits at once with status 2 ("cannot reach
    RabbitMQ": it does not retry its first connection, by design); a supervisor restarts it, and
    so does this run. That is counted apart. Any other exit is reported as unexpected.
    """
    tail = services.output(name, 12)
    last = tail.splitlines()[-1] if tail else ""
    if code == 2 and "cannot reach RabbitMQ" in last:
        log.counts["start_without_broker"] += 1
        log.note(f"{name} could not reach the broker at start: restarting it")
        time.sleep(0.5)
        return False
    log.counts["unexpected_exit"] += 1
    log.unexpected_exits.append(f"{name} exited with status {code}:\n{tail}")
    log.note(f"{name} exited unexpectedly with status {code}")
    return True


def restart_dead_services(services: ServiceGroup, log: FaultLog) -> None:
    """For the quiet phase (the injector has stopped): same as :meth:`FaultInjector.watch`."""
    for name, process in list(services.processes.items()):
        code = process.poll()
        if code is not None:
            note_exit(services, log, name, code)
            argv, env = services.commands[name]
            services.start(name, argv, {k: v for k, v in env.items() if k != CRASHPOINTS_ENV})
            log.last_restart = time.monotonic()
