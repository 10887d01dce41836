"""``twophase bench``: throughput and latency of the whole system, with baselines measured alike.

It starts the coordinator and N bank participants as separate processes, drives transactions
through the client library (closed loop with C in flight, or open loop at a target rate), warms
up, then measures a window. Messages and forced log writes are counted by the services
themselves (``TWOPHASE_STATS_FILE``), not assumed. The baselines of the same run: the broker's
ceiling (persistent messages through a durable queue, divided by our messages per transaction)
and a naive in-process psycopg two-phase commit over the same databases.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.client import Client
from runtime import config, selfstats
from runtime.errors import ConfigurationError
from runtime.store import database_url, psycopg_url
from schemas import topology
from schemas.messages import Branch, Outcome, OutcomeKind
from twophase import bank, bench_machine
from twophase.bench_baselines import broker_ceiling, naive_two_phase_commit
from twophase.bench_report import percentile, plot_sweep, print_table
from twophase.processes import Keys, ServiceGroup

RESOURCES = ("reservation", "postgres", "sqlite")
#: the steps of a driver's turn whose wall time the services count (``DriverStats``)
TURN_STEPS = ("handle_ns", "flush_ns", "publish_ns", "ack_ns")
ACCOUNTS = 20_000
OPENING = 10**12


#: where Debian's PostgreSQL listens locally; a Unix socket costs the client and the server
#: less system time per statement than TCP over loopback (measured: 41 against 51 us of client
#: CPU per round trip), and the services here make many round trips
LOCAL_PG_SOCKET = Path("/var/run/postgresql/.s.PGSQL.5432")


def default_pg_url() -> str:
    if LOCAL_PG_SOCKET.exists():
        return f"postgresql://postgres@/postgres?host={LOCAL_PG_SOCKET.parent}"
    return "postgresql://postgres@127.0.0.1:5432/postgres"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--participants", type=int, default=3)
    p.add_argument(
        "--resource",
        choices=RESOURCES,
        default="reservation",
        help="reservation (on PostgreSQL), postgres (native branches) or sqlite",
    )
    p.add_argument(
        "--log",
        choices=("postgres", "sqlite"),
        default="postgres",
        help="where the coordinator and participant logs live",
    )
    p.add_argument(
        "--one-phase",
        choices=("on", "off"),
        default="on",
        help="single-branch transactions in one phase (the coordinator's TWOPHASE_ONE_PHASE)",
    )
    p.add_argument(
        "--auth",
        choices=("on", "off"),
        default="on",
        help="on: every process and the client sign and verify with keys the bench makes in its"
        " work directory; off: as the environment says (no key there: none)",
    )
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    p.add_argument("--concurrency", type=int, default=128, help="closed loop: tx in flight")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: offered tx/s (0: closed)")
    p.add_argument("--amqp-url")
    p.add_argument(
        "--pg-url",
        default=default_pg_url(),
        help="a PostgreSQL server URL; the bench creates its own database there (default: the"
        " local server, over its Unix socket when it has one)",
    )
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also sweep open-loop rates and plot latency against offered load",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work directory and database")


@dataclass
class Window:
    committed: int = 0
    aborted: int = 0
    unknown: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0


class Load:
    """Submits transfers and records outcomes that complete inside the measured window."""

    def __init__(self, client: Client, names: list[str], seed: int = 7) -> None:
        self.client, self.names = client, names
        self.rng = random.Random(seed)
        self.window = Window()
        self.measuring = False
        self.lock = threading.Lock()
        self.in_flight = 0
        self.idle = threading.Condition(self.lock)

    def branches(self) -> list[Branch]:
        payer = self.rng.randrange(len(self.names))
        others = len(self.names) - 1
        result = []
        for i, name in enumerate(self.names):
            account = f"{name}-{self.rng.randrange(ACCOUNTS)}"
            if i == payer:
                result.append(Branch(name, "debit", {"account": account, "amount": max(others, 1)}))
            else:
                result.append(Branch(name, "credit", {"account": account, "amount": 1}))
        return result

    def submit(self, started: float) -> Future[Outcome]:
        with self.lock:
            self.in_flight += 1
            branches = self.branches()
        future = self.client.submit_future(branches, timeout=10.0)
        future.add_done_callback(lambda f: self._done(started, f))
        return future

    def _done(self, started: float, future: Future[Outcome]) -> None:
        latency_ms = (time.perf_counter() - started) * 1000
        outcome = future.result() if future.exception() is None else None
        with self.lock:
            self.in_flight -= 1
            self.idle.notify_all()
            if not self.measuring:
                return
            w = self.window
            if outcome is None:
                w.unknown += 1
            elif outcome.outcome is OutcomeKind.COMMITTED:
                w.committed += 1
                w.latencies_ms.append(latency_ms)
            else:
                w.aborted += 1
                w.latencies_ms.append(latency_ms)

    def closed_loop(self, concurrency: int, until: float) -> None:
        slots = threading.Semaphore(concurrency)
        while time.perf_counter() < until:
            slots.acquire()
            self.submit(time.perf_counter()).add_done_callback(lambda _f: slots.release())

    def open_loop(self, rate: float, until: float) -> None:
        """Send on schedule whatever the answers do; latency counts from the scheduled time."""
        interval = 1.0 / rate
        next_at = time.perf_counter()
        while next_at < until:
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.submit(next_at)
            next_at += interval

    def drain(self, timeout: float = 30.0) -> None:
        with self.lock:
            self.idle.wait_for(lambda: self.in_flight == 0, timeout)


def measure(load: Load, args: argparse.Namespace, stats: StatsFiles, rate: float) -> dict[str, Any]:
    start = time.perf_counter()

    def drive(until: float) -> None:
        if rate:
            load.open_loop(rate, until)
        else:
            load.closed_loop(args.concurrency, until)

    drive(start + args.warmup)
    before = stats.snapshot()
    client_before = (load.client.messages_sent, load.client.protocol_messages_sent)
    with load.lock:
        load.window = Window()
        load.measuring = True
    window_start = time.perf_counter()
    machine_before = bench_machine.snapshot()
    drive(window_start + args.duration)
    machine_after = bench_machine.snapshot()
    with load.lock:
        load.measuring = False
        window = load.window
    window.seconds = time.perf_counter() - window_start
    after = stats.snapshot()
    client_messages = (
        load.client.messages_sent - client_before[0],
        load.client.protocol_messages_sent - client_before[1],
    )
    load.drain()
    result = summarize(window, before, after, client_messages, rate)
    done = window.committed + window.aborted
    result["machine"] = bench_machine.summarize(machine_before, machine_after, done)
    return result


def summarize(
    w: Window,
    before: dict[str, dict[str, Any]],
    after: dict[str, dict[str, Any]],
    client_messages: tuple[int, int],
    rate: float,
) -> dict[str, Any]:
    done = max(w.committed + w.aborted, 1)
    processes = {}
    messages, protocol_messages = client_messages
    flushes = 0
    for name, end in after.items():
        start = before.get(name, {})
        counted = (
            "messages_out",
            "protocol_messages_out",
            "log_flushes",
            "cpu_s",
            "batches",
            *TURN_STEPS,
        )
        delta = {k: end.get(k, 0) - start.get(k, 0) for k in counted}
        messages += delta["messages_out"]
        protocol_messages += delta["protocol_messages_out"]
        flushes += delta["log_flushes"]
        processes[name] = {
            "cpu_ms_per_tx": round(1000 * delta["cpu_s"] / done, 3),
            "peak_rss_mib": round(end.get("peak_rss_mib", 0.0), 1),
        }
        if delta["batches"]:
            processes[name]["batches_per_tx"] = round(delta["batches"] / done, 2)
            processes[name]["turn_ms_per_batch"] = {
                step.removesuffix("_ns"): round(delta[step] / delta["batches"] / 1e6, 3)
                for step in TURN_STEPS
            }
    lat = sorted(w.latencies_ms)
    return {
        "offered_per_s": rate or None,
        "committed_per_s": round(w.committed / w.seconds, 1),
        "aborted_per_s": round(w.aborted / w.seconds, 1),
        "unknown": w.unknown,
        "p50_ms": round(percentile(lat, 50), 2),
        "p95_ms": round(percentile(lat, 95), 2),
        "p99_ms": round(percentile(lat, 99), 2),
        "max_ms": round(lat[-1], 2) if lat else 0.0,
        "messages_per_tx": round(messages / done, 2),
        "protocol_messages_per_tx": round(protocol_messages / done, 2),
        "forced_writes_per_tx": round(flushes / done, 2),
        "processes": processes,
    }


class StatsFiles:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def path(self, name: str) -> str:
        return str(self.workdir / f"{name}.stats.json")

    def snapshot(self) -> dict[str, dict[str, Any]]:
        time.sleep(0.6)  # let every service rewrite its file once
        found = {}
        for path in self.workdir.glob("*.stats.json"):
            data = selfstats.read(path)
            if data is not None:
                found[path.name.removesuffix(".stats.json")] = data
        found["bench-client"] = selfstats.usage() | {"messages_out": 0, "log_flushes": 0}
        return found


def _create_database(pg_url: str, name: str) -> str:
    import psycopg

    admin = psycopg_url(database_url(pg_url))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return _on_database(admin, name)


def _on_database(url: str, name: str) -> str:
    """``url`` with its database replaced by ``name`` (query options, e.g. ``host=``, kept)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _drop_database(pg_url: str, name: str) -> None:
    import psycopg

    admin = psycopg_url(database_url(pg_url))
    with psycopg.connect(admin, autocommit=True) as conn:
        for (gid,) in conn.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = %s", (name,)
        ).fetchall():
            with psycopg.connect(_on_database(admin, name), autocommit=True) as db:
                db.execute(f"ROLLBACK PREPARED '{gid}'")
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _exit_on_sigterm() -> None:
    """SIGTERM ends the bench as Ctrl-C does: its services stop and its database is dropped
    (by default the signal would kill the bench alone and leave its services running)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda _signal, _frame: sys.exit(128 + signal.SIGTERM))


def run_bench(args: argparse.Namespace) -> int:
    _exit_on_sigterm()
    url = config.amqp_url(args.amqp_url)
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - fail before minutes of measuring, not after
        except ImportError:
            raise ConfigurationError(
                "--plot needs matplotlib: pip install 'twophase[plot]'"
            ) from None
    workdir = Path(tempfile.mkdtemp(prefix="twophase-bench-"))
    db_name = f"twophase_bench_{uuid.uuid4().hex[:8]}"
    needs_pg = args.log == "postgres" or args.resource != "sqlite"
    db_url = _create_database(args.pg_url, db_name) if needs_pg else ""
    names = [f"bench-{i + 1}" for i in range(args.participants)]
    stats = StatsFiles(workdir)
    try:
        result = _run(args, url, workdir, db_url, names, stats)
    finally:
        if not args.keep:
            if needs_pg:
                _drop_database(args.pg_url, db_name)
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result, sys.stdout)
    return 0


def _run(
    args: argparse.Namespace,
    url: str,
    workdir: Path,
    db_url: str,
    names: list[str],
    stats: StatsFiles,
) -> dict[str, Any]:
    def log_url(name: str) -> str:
        return db_url if args.log == "postgres" else str(workdir / f"{name}.log.db")

    def resource_db(name: str) -> str:
        return str(workdir / f"{name}.db") if args.resource == "sqlite" else db_url

    for name in names:
        bank.open_accounts(
            resource_db(name), name, [(f"{name}-{i}", OPENING) for i in range(ACCOUNTS)]
        )
    kind = "reservation" if args.resource == "sqlite" else args.resource
    result: dict[str, Any] = {
        "setup": {
            "participants": args.participants,
            "resource": args.resource,
            "log": args.log,
            "one_phase": args.one_phase,
            "auth": args.auth,
            "mode": f"open loop at {args.rate}/s"
            if args.rate
            else f"closed loop, {args.concurrency} in flight",
            "duration_s": args.duration,
            "warmup_s": args.warmup,
        }
    }
    keys = Keys(workdir / "keys", names, ["bench"]) if args.auth == "on" else None
    with ServiceGroup(url, workdir, keys=keys) as services:
        services.start_coordinator(
            TWOPHASE_LOG_URL=log_url("coordinator"),
            TWOPHASE_STATS_FILE=stats.path("coordinator"),
            TWOPHASE_ONE_PHASE=args.one_phase,
        )
        for name in names:
            services.start_bank(
                name,
                resource_db(name),
                kind,
                TWOPHASE_LOG_URL=log_url(name),
                TWOPHASE_STATS_FILE=stats.path(name),
            )
        services.wait_ready([topology.COORDINATOR_QUEUE, *map(topology.participant_queue, names)])
        key_file, keyring = keys.client("bench") if keys else (None, None)
        with Client(url, key_file=key_file, keyring=keyring) as client:
            load = Load(client, names)
            result.update(measure(load, args, stats, args.rate))
            if args.plot:
                result["sweep"] = _sweep(load, args, stats, result["committed_per_s"])
    if args.plot:
        plot_sweep(result["sweep"], args.plot)
    if not args.no_baselines:
        result["baselines"] = _baselines(url, db_url, names, result, args)
    return result


def _sweep(
    load: Load, args: argparse.Namespace, stats: StatsFiles, capacity: float
) -> list[dict[str, Any]]:
    short = argparse.Namespace(
        **{**vars(args), "duration": max(4.0, args.duration / 4), "warmup": 1.0}
    )
    points = []
    for fraction in (0.25, 0.5, 0.75, 0.9, 1.0, 1.2):
        rate = max(1.0, capacity * fraction)
        points.append(measure(load, short, stats, rate))
    return points


def _baselines(
    url: str, db_url: str, names: list[str], result: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    ceiling = broker_ceiling(url, seconds=5.0)
    # Envelopes carry many protocol messages each, so the ceiling is given both ways: for the
    # AMQP messages we really send, and for one AMQP message per protocol message (unbatched).
    per_tx = result["messages_per_tx"] or 1.0
    per_tx_unbatched = result["protocol_messages_per_tx"] or 1.0
    baselines: dict[str, Any] = {
        "broker_messages_per_s": round(ceiling, 1),
        "broker_ceiling_tx_per_s": round(ceiling / per_tx, 1),
        "ratio_to_broker_ceiling": round(result["committed_per_s"] / (ceiling / per_tx), 3),
        "broker_ceiling_unbatched_tx_per_s": round(ceiling / per_tx_unbatched, 1),
        "ratio_to_unbatched_ceiling": round(
            result["committed_per_s"] / (ceiling / per_tx_unbatched), 3
        ),
    }
    if db_url:
        naive = naive_two_phase_commit(db_url, names, ACCOUNTS, seconds=5.0)
        baselines["naive_psycopg_2pc_tx_per_s"] = round(naive, 1)
        baselines["ratio_to_naive_2pc"] = (
            round(result["committed_per_s"] / naive, 2) if naive else None
        )
    return baselines
