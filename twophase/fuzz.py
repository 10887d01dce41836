"""``twophase fuzz``: the chaos bank under a flood of hostile messages (issue 12).

The coordinator and the three banks of ``twophase chaos`` run as separate processes (two banks on
native PostgreSQL branches, one on a SQLite reservation) in a fresh virtual host and database,
with real transfers going through the client library. Alongside, hostile messages are published
straight to every queue (the coordinator's, each bank's, the client's reply queue): random
bytes, spoiled encodings, wrong types, sizes at and past the limits, unknown kinds, invalid names
and ids, odd AMQP properties and headers, and replays of real messages captured on the way
(:mod:`twophase.fuzz_corpus`, :mod:`twophase.fuzz_traffic`). Then, once quiet, the run checks:

* no service exited (the same PIDs throughout);
* the chaos checks (:func:`twophase.chaos_checks.judge`): every real transfer has one outcome
  everywhere, as the client was told, balances are conserved account by account, nothing is in
  doubt;
* every hostile message a service must refuse is in the dead-letter queue once, with a reason of
  the right category, and nothing it must take (replays, well-formed strangers) is;
* each service's RSS grew by at most 20 % from after the warm-up to the end;
* the durable rows hostile messages caused are bounded (:mod:`twophase.fuzz_checks`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika.exceptions
import psycopg
from psycopg import sql

from coordinator.client import Client
from runtime import config
from runtime.amqp import AmqpChannel
from runtime.driver import now_ms
from runtime.errors import BrokerUnavailable
from runtime.redaction import redact_url
from schemas import topology
from schemas.validation import COORDINATOR_ACCEPTS, PARTICIPANT_ACCEPTS
from twophase import bank
from twophase.chaos import (
    DEFAULT_PG_URL,
    OPENING_BALANCE,
    ChaosConfig,
    Load,
    _client_alive,
    _drop_database,
    _fresh_database,
    _fresh_vhost,
    _wait_quiet,
)
from twophase.chaos_checks import BANKS, RESERVATION_BANK, ChaosResult, Inspector, judge
from twophase.chaos_faults import Broker, FaultLog, vhost_of
from twophase.fuzz_checks import (
    FuzzResult,
    fuzz_checks,
    print_report,
    rss_kib,
    service_connections,
)
from twophase.fuzz_corpus import Context, Corpus
from twophase.fuzz_traffic import (
    KINDS,
    HostilePublisher,
    Ledger,
    Observer,
    Target,
    client_target,
)
from twophase.processes import ServiceGroup

__all__ = ["FuzzConfig", "FuzzResult", "run_fuzz", "run_fuzz_command"]

#: a protocol queue that gets no shorter for this long means its service stopped consuming
STALL_S = 60.0
#: how long the answers and the quiet are waited for after that
STALLED_WAIT_S = 15.0


class _Stalled(Exception):
    pass


@dataclass
class FuzzConfig:
    amqp_url: str
    pg_url: str
    data_dir: Path
    messages: int = 10_000
    #: real transfers alongside (default: one per 100 hostile messages, at least 60)
    transfers: int | None = None
    concurrency: int = 16
    seed: int | None = None
    replay_share: float = 0.1
    tx_timeout_s: float = 10.0
    answer_timeout_s: float = 180.0
    quiet_timeout_s: float = 180.0
    #: how long to wait for the last dead letters once the services are quiet
    dead_letter_wait_s: float = 30.0
    #: generator and header kinds left out (``twophase.fuzz_corpus.KINDS``)
    without: frozenset[str] = frozenset()
    on_progress: Any = None


class _FuzzInspector(Inspector):
    """The chaos inspector, blind to the coordinator's decisions on hostile transactions.

    Those are not "transactions nobody submitted": hostile senders submitted them, and may vote
    in them too, since votes carry no proof of their sender (a well-formed Begin and a forged
    COMMITTED vote that share a tx_id make the coordinator commit what the participant refused).
    Money they might move is still seen: by the balances and by commits at the banks of tx_ids
    no real transfer has. The hostile commits are counted (``hostile_commits``)."""

    def __init__(self, real: set[str], *args: Any) -> None:
        super().__init__(*args)
        self.real = real
        self.hostile_commits: list[str] = []

    def decisions(self) -> tuple[dict[str, str], list[str]]:
        decided, both = super().decisions()
        self.hostile_commits = sorted(
            t for t, d in decided.items() if t not in self.real and d == "commit"
        )
        return {t: d for t, d in decided.items() if t in self.real}, both


def _targets(client_queue: str) -> list[Target]:
    banks = [Target(topology.participant_queue(b), PARTICIPANT_ACCEPTS, 0.15) for b in BANKS]
    return [
        Target(topology.COORDINATOR_QUEUE, COORDINATOR_ACCEPTS, 0.4),
        *banks,
        client_target(client_queue, 0.15),
    ]


def _warm_up_sizes(publisher: HostilePublisher, corpus: Corpus) -> None:
    """A body exactly at the size limit, and one byte past it, to every service: the largest
    buffers a service ever allocates are allocated before its RSS is taken as the baseline."""
    limit = corpus.ctx.limits.max_message_bytes
    for target in publisher.targets:
        if not target.client:
            for size in (limit, limit + 1):
                publisher.publish_one(corpus.padded(size), target)


def run_fuzz(cfg: FuzzConfig) -> FuzzResult:
    """Run the fuzz; ``result.ok`` says whether every check passed."""
    began = time.monotonic()
    seed = cfg.seed if cfg.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    run_id = uuid.UUID(int=rng.getrandbits(128)).hex[:8]
    transfers = cfg.transfers or max(60, cfg.messages // 100)
    say = cfg.on_progress or (lambda _text: None)
    chaos_cfg = ChaosConfig(
        amqp_url=cfg.amqp_url,
        pg_url=cfg.pg_url,
        data_dir=cfg.data_dir,
        transfers=transfers,
        kills=0,
        concurrency=cfg.concurrency,
        seed=seed,
        broker_restart=False,
        crashpoints=False,
        tx_timeout_s=cfg.tx_timeout_s,
        answer_timeout_s=cfg.answer_timeout_s,
        quiet_timeout_s=cfg.quiet_timeout_s,
    )
    accounts = max(32, 4 * cfg.concurrency)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    base = ChaosResult(transfers=transfers, seed=seed, data_dir=str(cfg.data_dir))
    result = FuzzResult(base=base, messages=cfg.messages)
    coordinator_log = str(cfg.data_dir / "coordinator.log.db")
    bank_c_db = str(cfg.data_dir / f"{RESERVATION_BANK}.db")
    databases = {name: bank_c_db if name == RESERVATION_BANK else cfg.pg_url for name in BANKS}
    opening: dict[tuple[str, str], int] = {}
    for name, url in databases.items():
        balances = {f"{name}-{i}": OPENING_BALANCE for i in range(accounts)}
        bank.open_accounts(url, name, balances.items())
        opening.update({(name, account): amount for account, amount in balances.items()})
    base.total_before = sum(opening.values())

    services = ServiceGroup(
        cfg.amqp_url,
        cfg.data_dir,
        # a demo on this machine may hold the metrics port; a flood needs no metrics endpoint
        extra_env={"TWOPHASE_METRICS_PORT": "0", "TWOPHASE_LIVENESS_TIMEOUT": "3"},
    )
    observer: Observer | None = None
    publisher: HostilePublisher | None = None
    try:
        services.start_coordinator(TWOPHASE_LOG_URL=coordinator_log)
        for name, url in databases.items():
            if name == RESERVATION_BANK:
                services.start_bank(name, url, "reservation", TWOPHASE_LOG_URL=url)
            else:
                services.start_bank(name, url, "postgres")
        services.wait_ready(
            [topology.COORDINATOR_QUEUE, *(topology.participant_queue(b) for b in BANKS)]
        )
        with Client(cfg.amqp_url, connect_attempts=5) as client:
            targets = _targets(client.reply_queue)
            ledger = Ledger()
            observer = Observer(cfg.amqp_url, ledger, [t.queue for t in targets])
            observer.start_and_wait()
            budget = max(8 << 20, min(128 << 20, cfg.messages << 10))
            limits = config.limits()  # what the services were started with
            context = Context(BANKS, [client.reply_queue], now_ms, limits, budget)
            context.without = cfg.without
            corpus = Corpus(random.Random(rng.getrandbits(64)), context)
            publisher = HostilePublisher(
                cfg.amqp_url,
                ledger,
                corpus,
                targets,
                observer,
                rng=random.Random(rng.getrandbits(64)),
                limits=limits,
                replay_share=cfg.replay_share,
                now_ms=now_ms,
            )
            load = Load(client, chaos_cfg, random.Random(rng.getrandbits(64)), run_id, accounts)
            _flood(cfg, result, services, publisher, corpus, load, say)
            publisher.close()  # idle from here on: the broker would drop it for silence
            say("hostile messages sent; waiting for the real transfers' answers")
            if publisher.stalled:  # a stuck service answers nobody: the checks say the rest
                chaos_cfg.answer_timeout_s = chaos_cfg.quiet_timeout_s = STALLED_WAIT_S
            load.wait_for_answers(chaos_cfg.answer_timeout_s)
            client_alive = _client_alive(client)
        say("waiting until quiet")
        inspector = _FuzzInspector(
            set(load.transfers), cfg.pg_url, cfg.data_dir, coordinator_log, bank_c_db
        )
        try:
            fault_log = FaultLog()
            try:
                _quiet_at, doubt, services_up = _wait_quiet(
                    chaos_cfg, services, inspector, fault_log
                )
            except pika.exceptions.AMQPError as exc:  # the probe's channel lets pika's out
                doubt, services_up = {"not quiet": [f"broker: {exc!r}"]}, False
            _wait_for_dead_letters(ledger, cfg.dead_letter_wait_s)
            result.rss_end = {n: rss_kib(p.pid) for n, p in services.processes.items()}
            result.pids_end = {n: p.pid for n, p in services.processes.items()}
            result.exits = {n: p.poll() for n, p in services.processes.items() if p.poll()}
            judge(
                base,
                load.transfers,
                load.abort_reasons,
                load.client_errors,
                inspector,
                opening,
                doubt,
                services_up,
                client_alive,
                fault_log,
            )
            result.disturbances = publisher.disturbances + observer.disturbances
            result.connections_end = service_connections(vhost_of(cfg.amqp_url))
            fuzz_checks(result, ledger, publisher.stats, inspector, set(load.transfers))
        finally:
            inspector.close()
    finally:
        try:
            if publisher is not None:
                publisher.close()
            if observer is not None:
                observer.stop()
        finally:
            services.stop_all()
    base.total_s = result.total_s = time.monotonic() - began
    return result


def _flood(
    cfg: FuzzConfig,
    result: FuzzResult,
    services: ServiceGroup,
    publisher: HostilePublisher,
    corpus: Corpus,
    load: Load,
    say: Any,
) -> None:
    """Warm up, take the baseline (RSS, PIDs), then the rest of the hostile messages, with the
    real transfers spread over the whole flood."""
    done = threading.Event()
    messages = cfg.messages
    per_transfer = messages / max(1, load.cfg.transfers)

    def gate(i: int) -> None:
        while not done.is_set() and publisher.stats.sent < i * per_transfer:
            time.sleep(0.02)
        if publisher.stalled:
            raise _Stalled  # a stuck service answers no transfer: submit no more

    def submit() -> None:
        with contextlib.suppress(_Stalled):
            load.run(gate)

    loader = threading.Thread(target=submit, name="twophase-fuzz-load")
    loader.start()
    try:
        warm = max(100, min(5_000, messages // 20))
        began = time.monotonic()
        _warm_up_sizes(publisher, corpus)
        publisher.publish(max(0, min(messages, warm) - publisher.stats.sent))
        _settle_warm_up(publisher, load)
        result.warmup_s = time.monotonic() - began
        result.rss_warm = {n: rss_kib(p.pid) for n, p in services.processes.items()}
        result.pids_warm = {n: p.pid for n, p in services.processes.items()}
        result.connections_warm = service_connections(vhost_of(load.cfg.amqp_url))
        say(
            f"warm-up: {publisher.stats.sent} hostile messages; RSS {result.rss_warm} KiB"
            + (f"; a service stopped consuming: {publisher.stalled}" if publisher.stalled else "")
        )
        began = time.monotonic()
        next_report = [began + 10]

        def progress() -> None:
            now = time.monotonic()
            rss = {n: rss_kib(p.pid) for n, p in services.processes.items()}
            for name, kib in rss.items():
                result.rss_peak[name] = max(result.rss_peak.get(name, 0), kib)
            if now >= next_report[0]:
                next_report[0] = now + 10
                say(
                    f"{publisher.stats.sent}/{messages} hostile messages, "
                    f"{load.seen}/{load.cfg.transfers} transfers answered, "
                    f"{publisher.ledger.dead_total} dead letters"
                )

        publisher.publish(max(0, messages - publisher.stats.sent), on_batch=progress)
        if not publisher.stalled:
            publisher.drain(0, STALL_S)
        result.flood_s = time.monotonic() - began
        result.stalled = dict(publisher.stalled)
    finally:
        done.set()
        loader.join()


def _settle_warm_up(publisher: HostilePublisher, load: Load, timeout_s: float = 120.0) -> None:
    """Until the protocol queues are drained and the warm-up share of transfers answered."""
    if not publisher.drain(0, STALL_S):
        return
    deadline = time.monotonic() + timeout_s
    want = max(1, load.cfg.transfers // 20)
    while time.monotonic() < deadline and load.seen < min(want, load.submitted):
        publisher.pause(0.2)
    publisher.pause(1.0)  # the last batches' garbage is collected


def _wait_for_dead_letters(ledger: Ledger, timeout_s: float) -> None:
    """Until every expected dead letter arrived, or none arrived for a few seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ledger.matched_dead() >= ledger.expected_dead():
            return
        if time.monotonic() - ledger.last_dead_at > 10:
            return
        time.sleep(0.2)


# ---- the command --------------------------------------------------------------------------------


def run_fuzz_command(args: argparse.Namespace) -> int:
    def say(text: str) -> None:
        print(f"twophase fuzz: {text}", file=sys.stderr, flush=True)

    without = frozenset(k for k in args.without.split(",") if k)
    if without - set(KINDS) or args.messages < 1:
        say(f"unknown kinds {sorted(without - set(KINDS))}, or --messages < 1")
        return 2
    url = config.amqp_url(args.amqp_url)
    pg_server = args.pg_url or os.environ.get("TWOPHASE_TEST_PG_URL") or DEFAULT_PG_URL
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="twophase-fuzz-"))
    try:
        with _fresh_places(url, pg_server, args.keep, say) as (amqp_url, pg_url):
            result = run_fuzz(
                FuzzConfig(
                    amqp_url,
                    pg_url,
                    data_dir,
                    messages=args.messages,
                    transfers=args.transfers,
                    seed=args.seed,
                    without=without,
                    on_progress=say,
                )
            )
    except _Unavailable as exc:
        say(str(exc))
        return 2
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print_report(result)
    return 0 if result.ok else 1


class _Unavailable(Exception):
    """The broker, rabbitmqctl or PostgreSQL cannot be used: nothing was run."""


@contextlib.contextmanager
def _fresh_places(url: str, pg_server: str, keep: bool, say: Any) -> Iterator[tuple[str, str]]:
    """(AMQP URL of a fresh vhost, URL of a fresh database), dropped afterwards unless ``keep``.

    SIGTERM (a CI timeout, say) unwinds like Ctrl-C meanwhile, so that the services are stopped
    and all is dropped, rather than left running against a deleted vhost."""
    try:
        AmqpChannel(url, connection_name="twophase-fuzz-probe", connect_attempts=8).close()
    except BrokerUnavailable as exc:
        raise _Unavailable(str(exc)) from None
    if not Broker.available():
        raise _Unavailable("needs rabbitmqctl on the PATH (for a fresh vhost)")
    run_id = "fuzz-" + uuid.uuid4().hex[:8]
    try:
        db_name, pg_url = _fresh_database(pg_server, run_id.replace("-", "_"))
    except (psycopg.Error, RuntimeError) as exc:
        raise _Unavailable(f"PostgreSQL at {redact_url(pg_server)}: {exc}") from None
    vhost, amqp_url = _fresh_vhost(url, run_id)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield amqp_url, pg_url
    finally:
        signal.signal(signal.SIGTERM, previous)
        if keep:
            say(f"kept: database {db_name}, vhost {vhost}")
        else:
            _roll_back_prepared(pg_url)
            _drop_database(pg_server, db_name)
            Broker.ctl("delete_vhost", vhost, check=False)


def _exit_on_sigterm(_signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signal.SIGTERM)


def _roll_back_prepared(pg_url: str) -> None:
    """A run that failed may leave native branches prepared, which keep the database in use."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        gids = conn.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
        ).fetchall()
        for (gid,) in gids:
            conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--amqp-url", help="RabbitMQ URL [TWOPHASE_AMQP_URL]; a fresh vhost is made")
    p.add_argument("--pg-url", help="PostgreSQL server; a fresh database is made on it")
    p.add_argument("--data-dir", help="where the logs and outputs go (default: a temporary dir)")
    p.add_argument("--messages", type=int, default=10_000, help="hostile messages (default 10000)")
    p.add_argument("--transfers", type=int, default=None, help="real transfers (default N/100)")
    p.add_argument("--seed", type=int, default=None, help="random seed of inputs and load")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--keep", action="store_true", help="keep the vhost and database afterwards")
    p.add_argument(
        "--without",
        default="",
        help="comma-separated generator or header kinds to leave out, of: " + ", ".join(KINDS),
    )
