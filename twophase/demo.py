"""``twophase demo``: a coordinator and three bank participants, as separate processes, moving
money with concurrent three-branch transfers (debit, credit, fee) through the client library.

Metrics: with ``TWOPHASE_METRICS_PORT=P`` the coordinator serves ``/metrics`` on port P and the
banks on P+1, P+2 and P+3 (one port each: they would clash on one); without it, as the services
do by default (the coordinator on 9464 if free, the banks none)."""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.client import Client
from runtime import config
from runtime.amqp import AmqpChannel
from runtime.errors import BrokerUnavailable, ConfigurationError
from schemas import topology
from schemas.messages import Branch, Outcome, OutcomeKind
from twophase import bank
from twophase.bench_report import percentile
from twophase.processes import Keys, ServiceGroup

BANKS = ("bank-a", "bank-b", "bank-c")
OPENING_BALANCE = 1_000
FEE = 1


def broker_hint(url: str, exc: BrokerUnavailable) -> str:
    return (
        f"{exc}. Start a broker with `rabbitmq-server -detached` (or `docker compose -f "
        f"compose/docker-compose.yml up -d rabbitmq`), or point --amqp-url / TWOPHASE_AMQP_URL "
        f"at one."
    )


@dataclass
class DemoResult:
    committed: int = 0
    aborted: int = 0
    unknown: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    abort_reasons: dict[str, int] = field(default_factory=dict)

    def record(self, outcome: Outcome | None, latency_ms: float) -> None:
        if outcome is None:
            self.unknown += 1
            return
        self.latencies_ms.append(latency_ms)
        if outcome.outcome is OutcomeKind.COMMITTED:
            self.committed += 1
        else:
            self.aborted += 1
            why = outcome.reason.split("voted NO: ", 1)[-1]
            kind = re.split(r" in |:", why)[0]
            self.abort_reasons[kind] = self.abort_reasons.get(kind, 0) + 1


def random_transfer(rng: random.Random, accounts: int) -> list[Branch]:
    payer, payee, fee_bank = rng.sample(BANKS, 3)
    amount = rng.randint(1, 400)
    return [
        Branch(
            payer,
            "debit",
            {"account": f"{payer}-{rng.randrange(accounts)}", "amount": amount + FEE},
        ),
        Branch(
            payee, "credit", {"account": f"{payee}-{rng.randrange(accounts)}", "amount": amount}
        ),
        Branch(fee_bank, "credit", {"account": f"{fee_bank}-0", "amount": FEE}),
    ]


def run_transfers(
    client: Client,
    count: int,
    concurrency: int,
    accounts: int,
    seed: int | None,
    on_done: Any = None,
) -> DemoResult:
    rng = random.Random(seed)
    result = DemoResult()
    slots = threading.Semaphore(concurrency)
    lock = threading.Lock()
    finished = threading.Event()
    remaining = [count]

    def done(started: float, future: Future[Outcome]) -> None:
        latency = (time.perf_counter() - started) * 1000
        outcome = future.result() if future.exception() is None else None
        with lock:
            result.record(outcome, latency)
            remaining[0] -= 1
            if remaining[0] == 0:
                finished.set()
        slots.release()
        if on_done is not None:
            on_done()

    for _ in range(count):
        slots.acquire()
        started = time.perf_counter()
        future = client.submit_future(random_transfer(rng, accounts), timeout=10.0)
        future.add_done_callback(functools.partial(done, started))
    if count:
        finished.wait()
    return result


def metrics_ports(base: int) -> dict[str, int]:
    """Each service's ``TWOPHASE_METRICS_PORT``: ``base`` for the coordinator, the next ones for
    the banks; none when ``base`` is 0 (the services' defaults)."""
    if not base:
        return {}
    names = ["coordinator", *BANKS]
    if base + len(names) - 1 > 65535:
        raise ConfigurationError(
            f"TWOPHASE_METRICS_PORT {base}: the demo serves metrics on it and the"
            f" {len(names) - 1} ports after it, use one below {65536 - len(names) + 1}"
        )
    return {name: base + i for i, name in enumerate(names)}


def wait_until_settled(dbs: dict[str, Path], timeout_s: float = 60.0) -> tuple[int, int]:
    """Committed outcomes reach the banks after the client hears them: wait for holds to clear."""
    deadline = time.monotonic() + timeout_s
    while True:
        sums = [bank.totals(str(db), name) for name, db in dbs.items()]
        total, held = sum(s[0] for s in sums), sum(s[1] for s in sums)
        if held == 0 or time.monotonic() > deadline:
            return total, held
        time.sleep(0.1)


def run_demo(args: argparse.Namespace) -> int:
    url = config.amqp_url(args.amqp_url)
    try:
        AmqpChannel(url, connection_name="twophase-demo-probe").close()
    except BrokerUnavailable as exc:
        print(f"twophase demo: {broker_hint(url, exc)}", file=sys.stderr)
        return 2
    ports = metrics_ports(config.metrics_port(None, 0))
    workdir = Path(args.data_dir or tempfile.mkdtemp(prefix="twophase-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    dbs = {name: workdir / f"{name}.db" for name in BANKS}
    for name, db in dbs.items():
        bank.open_accounts(
            str(db), name, [(f"{name}-{i}", OPENING_BALANCE) for i in range(args.accounts)]
        )
    total_before = sum(bank.totals(str(db), name)[0] for name, db in dbs.items())

    # authentication on, as the issue asks of the demo (14): keys of its own, in its data dir
    keys = Keys(workdir / "keys", BANKS, ["demo"])
    with ServiceGroup(url, workdir, keys=keys) as services:
        services.start_coordinator(**_metrics_env(ports, "coordinator"))
        for name, db in dbs.items():
            services.start_bank(name, str(db), **_metrics_env(ports, name))
        services.wait_ready(
            [topology.COORDINATOR_QUEUE, *(topology.participant_queue(b) for b in BANKS)]
        )
        started = time.perf_counter()
        key_file, keyring = keys.client("demo")
        with Client(url, key_file=key_file, keyring=keyring) as client:
            result = _with_progress(args, client)
        elapsed = time.perf_counter() - started
        total_after, held = wait_until_settled(dbs)

    report = {
        "transfers": args.transfers,
        "committed": result.committed,
        "aborted": result.aborted,
        "unknown": result.unknown,
        "p50_ms": round(percentile(result.latencies_ms, 50), 2),
        "p99_ms": round(percentile(result.latencies_ms, 99), 2),
        "tx_per_s": round((result.committed + result.aborted) / elapsed, 1) if elapsed else 0.0,
        "total_before": total_before,
        "total_after": total_after,
        "held_after": held,
        "balanced": total_before == total_after and held == 0,
        "abort_reasons": result.abort_reasons,
        "data_dir": str(workdir),
    }
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    ok = report["balanced"] and result.unknown == 0
    return 0 if ok else 1


def _metrics_env(ports: dict[str, int], name: str) -> dict[str, str]:
    return {"TWOPHASE_METRICS_PORT": str(ports[name])} if name in ports else {}


def _with_progress(args: argparse.Namespace, client: Client) -> DemoResult:
    if args.json:
        return run_transfers(client, args.transfers, args.concurrency, args.accounts, args.seed)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task("transfers", total=args.transfers)
        return run_transfers(
            client,
            args.transfers,
            args.concurrency,
            args.accounts,
            args.seed,
            on_done=lambda: progress.advance(task),
        )


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="twophase demo: three banks, three-branch transfers")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in (
        "transfers",
        "committed",
        "aborted",
        "unknown",
        "p50_ms",
        "p99_ms",
        "tx_per_s",
        "total_before",
        "total_after",
    ):
        table.add_row(key, str(report[key]))
    verdict = (
        "[green]balanced: no money created or destroyed"
        if report["balanced"]
        else ("[red]UNBALANCED: money was created or destroyed")
    )
    table.add_row("balance check", verdict)
    console = Console()
    console.print(table)
    for reason, n in sorted(report["abort_reasons"].items(), key=lambda kv: -kv[1])[:3]:
        console.print(f"aborted {n}x: {reason}")
