"""``twophase chaos``: the bank under fire (docs/architecture.md §7, tests/chaos).

Three bank participants run as separate processes: ``bank-a`` and ``bank-b`` on native
PostgreSQL branches (one shared database, one accounts table each) and ``bank-c`` on a SQLite
reservation; a coordinator keeps its decision log in SQLite. A load of concurrent three-branch
transfers (debit at one bank, credit at another, a fee to the third) goes through the client
library, each transfer with its own ``tx_id``, and what the client saw is recorded: committed,
aborted, or unknown (no answer within ``client_wait_s``; the client keeps re-sending the ``Begin``
and a later answer is recorded too).

Meanwhile :mod:`twophase.chaos_faults` kills the coordinator and the banks with SIGKILL (and
restarts them after a short pause), restarts them with every named crash point armed in turn
(a process that exits there crashes there once more on its next start, then comes up clean),
closes our AMQP connections with ``rabbitmqctl close_connection`` and restarts the whole broker
once. Then the run waits until the system is quiet and checks it (:mod:`twophase.chaos_checks`):

* money is neither created nor destroyed, and every account holds exactly its opening balance
  plus the transfers the coordinator committed (each applied once);
* every transaction has one outcome everywhere: each bank's resource (commit marker of the
  native branch, state of the reservation) says committed iff the coordinator logged COMMIT,
  and the participants' logs agree;
* what the client was told is what happened: committed everywhere, or aborted (durably) nowhere;
* nothing is in doubt: no unfinished transaction in any log, no prepared PostgreSQL branch, no
  reservation still held.

Load and faults are driven by ``seed``; the processes' timing is not, so a run is not replayable
exactly, but a failing check names the transactions and banks involved, and every process keeps
its output in ``DATA_DIR/NAME.out`` (restarts are marked there).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import re
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg

from coordinator.client import Client
from runtime import config
from runtime.amqp import AmqpChannel
from runtime.errors import BrokerUnavailable, ConnectionLost
from runtime.redaction import redact_url
from schemas import topology
from schemas.messages import Outcome, OutcomeKind
from twophase import bank
from twophase.chaos_checks import (
    BANKS,
    RESERVATION_BANK,
    ChaosResult,
    Check,
    Inspector,
    Transfer,
    judge,
    print_summary,
)
from twophase.chaos_faults import (
    Broker,
    FaultInjector,
    FaultLog,
    plan_faults,
    restart_dead_services,
)
from twophase.processes import Keys, ServiceGroup

__all__ = ["ChaosConfig", "ChaosResult", "Check", "print_summary", "run_chaos"]

SERVICES = ("coordinator", *BANKS)
OPENING_BALANCE = 1_000
FEE = 1
#: the share of single-branch deposits and withdrawals, which commit in one phase
ONE_PHASE_SHARE = 0.2
#: an account stays out of new transfers this long after its transfer's answer (a native branch
#: holds its row lock until COMMIT PREPARED, which reaches the bank after the client hears)
ACCOUNT_GRACE_S = 0.5


@dataclass
class ChaosConfig:
    amqp_url: str
    pg_url: str
    data_dir: Path
    transfers: int = 300
    kills: int = 10
    kicks: int | None = None  # default: max(2, kills // 3)
    concurrency: int = 16
    seed: int | None = None
    broker_restart: bool = True
    crashpoints: bool = True
    #: after a crash at an armed point, crash there once more before coming up for good
    crash_loops: bool = True
    accounts: int | None = None  # per bank; default max(32, 4 * concurrency)
    tx_timeout_s: float = 5.0
    client_wait_s: float | None = None  # default 2 * tx_timeout_s + 5, as Client.submit
    answer_timeout_s: float = 180.0
    quiet_timeout_s: float = 180.0
    liveness_timeout_s: float = 3.0
    coordinator_log_url: str | None = None  # default DATA_DIR/coordinator.log.db
    on_progress: Callable[[str], None] | None = None


# ---- the load ---------------------------------------------------------------------------------


def _abort_kind(reason: str) -> str:
    why = reason.split("voted NO: ", 1)[-1]
    if " is down" in why:
        return "participant down"
    if why.startswith("unknown participant") and "no heartbeat" in why:
        return "no heartbeat yet"
    if why.startswith("no vote from"):
        return "vote timeout"
    for marker in (
        "insufficient funds",
        "coordinator restarted",
        "already aborted",
        "aborted by the coordinator",
        "lock timeout",
        "after its deadline",
    ):
        if marker in why:
            return marker
    return re.sub(r"chaos-[0-9a-f]+-\d+", "<tx>", why.split(":")[0])[:60]


class Load:
    """Submits the transfers, ``concurrency`` in flight, and records what the client saw."""

    def __init__(
        self, client: Client, cfg: ChaosConfig, rng: random.Random, run_id: str, accounts: int
    ) -> None:
        self.client = client
        self.cfg = cfg
        self.rng = rng
        self.run_id = run_id
        self.accounts = accounts
        self.transfers: dict[str, Transfer] = {}
        self.in_flight: dict[str, Transfer] = {}
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(cfg.concurrency)
        self.submitted = 0
        self.seen = 0
        self.answered = 0
        self.busy: dict[tuple[str, str], float] = {}
        self.backoff_until = 0.0
        self.abort_reasons: Counter[str] = Counter()
        self.client_errors: list[str] = []
        self.wait_s = cfg.client_wait_s or 2 * cfg.tx_timeout_s + 5

    def progress(self) -> int:
        return self.submitted

    def run(self, gate: Callable[[int], None]) -> None:
        for i in range(self.cfg.transfers):
            gate(i)
            while not self.slots.acquire(timeout=0.2):
                self.expire()
            self.expire()
            pause = self.backoff_until - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            transfer = self._new_transfer(i)
            with self.lock:
                self.transfers[transfer.tx_id] = transfer
                self.in_flight[transfer.tx_id] = transfer
                transfer.started = time.monotonic()
            future = self.client.submit_future(
                transfer.branches(), tx_id=transfer.tx_id, timeout=self.cfg.tx_timeout_s
            )
            self.submitted = i + 1
            future.add_done_callback(functools.partial(self._answered, transfer))
        while True:
            with self.lock:
                if not self.in_flight:
                    return
            self.expire()
            time.sleep(0.1)

    def _new_transfer(self, i: int) -> Transfer:
        payer, payee, fee_bank = self.rng.sample(BANKS, 3)
        amount = self.rng.randint(1, 400)
        single = self.rng.random() < ONE_PHASE_SHARE
        operation = self.rng.choice(("credit", "debit"))
        now = time.monotonic()
        with self.lock:
            if single:  # a deposit or a withdrawal: one branch, committed in one phase
                legs: tuple[tuple[str, str, str, int], ...] = (
                    (payee, operation, self._free_account(payee, now), amount),
                )
            else:
                legs = (
                    (payer, "debit", self._free_account(payer, now), amount + FEE),
                    (payee, "credit", self._free_account(payee, now), amount),
                    (fee_bank, "credit", self._free_account(fee_bank, now), FEE),
                )
            for b, _, account, _ in legs:
                self.busy[(b, account)] = math.inf
        return Transfer(f"chaos-{self.run_id}-{i:06d}", legs)

    def _free_account(self, bank_name: str, now: float) -> str:
        """A native branch locks its rows until COMMIT PREPARED, and a bank's worker is serial:
        two transfers in flight on one account make the second wait out its lock timeout and
        vote NO. A real bank would queue per account too; so the load keeps them apart."""
        names = [f"{bank_name}-{i}" for i in range(self.accounts)]
        free = [a for a in names if self.busy.get((bank_name, a), 0.0) <= now]
        return self.rng.choice(free or names)

    def _answered(self, transfer: Transfer, future: Future[Outcome]) -> None:
        error = future.exception()
        outcome = future.result() if error is None else None
        now = time.monotonic()
        with self.lock:
            if outcome is None:
                self.client_errors.append(f"{transfer.tx_id}: {error!r}")
                kind = "unknown"
            elif outcome.outcome is OutcomeKind.COMMITTED:
                kind = "committed"
            else:
                kind = "aborted"
                reason = _abort_kind(outcome.reason)
                self.abort_reasons[reason] += 1
                transfer.reason = outcome.reason
                if reason in ("participant down", "no heartbeat yet"):
                    self.backoff_until = now + 0.2  # a client would not hammer a down service
            if kind != "unknown":
                transfer.final = kind
                self.answered += 1
                for b, _, account, _ in transfer.legs:
                    self.busy[(b, account)] = now + ACCOUNT_GRACE_S
            first = transfer.seen == "pending"
            if first:
                transfer.seen = kind
                self.in_flight.pop(transfer.tx_id, None)
                self.seen += 1
        if first:
            self.slots.release()

    def expire(self) -> None:
        """Transfers without an answer after ``client_wait_s``: the client saw "unknown"."""
        now = time.monotonic()
        expired = []
        with self.lock:
            for tx_id, transfer in list(self.in_flight.items()):
                if now - transfer.started > self.wait_s:
                    transfer.seen = "unknown"
                    del self.in_flight[tx_id]
                    self.seen += 1
                    expired.append(transfer)
        for _ in expired:
            self.slots.release()

    def wait_for_answers(self, timeout_s: float) -> None:
        """The client keeps re-sending the Begin of an unanswered transfer: wait for the rest."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if all(t.final for t in self.transfers.values()):
                    return
            time.sleep(0.2)


def run_chaos(cfg: ChaosConfig) -> ChaosResult:
    """Run the chaos bank; the result carries every check's verdict (``result.ok``)."""
    began = time.monotonic()
    seed = cfg.seed if cfg.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    run_id = uuid.UUID(int=rng.getrandbits(128)).hex[:8]
    accounts = cfg.accounts or max(32, 4 * cfg.concurrency)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    result = ChaosResult(transfers=cfg.transfers, seed=seed, data_dir=str(cfg.data_dir))
    say = cfg.on_progress or (lambda _text: None)
    broker = Broker(cfg.amqp_url)
    coordinator_log_url = cfg.coordinator_log_url or str(cfg.data_dir / "coordinator.log.db")
    bank_c_db = str(cfg.data_dir / f"{RESERVATION_BANK}.db")

    opening = {}
    for name in BANKS:
        url = bank_c_db if name == RESERVATION_BANK else cfg.pg_url
        rows = [(f"{name}-{i}", OPENING_BALANCE) for i in range(accounts)]
        bank.open_accounts(url, name, rows)
        opening.update({(name, a): b for a, b in rows})
    result.total_before = sum(opening.values())

    keys = Keys(cfg.data_dir / "keys", BANKS, ["chaos"])
    services = ServiceGroup(
        cfg.amqp_url,
        cfg.data_dir,
        extra_env={"TWOPHASE_LIVENESS_TIMEOUT": str(cfg.liveness_timeout_s)},
        keys=keys,
    )
    injector: FaultInjector | None = None
    fault_log = FaultLog()
    load: Load | None = None
    try:
        services.start_coordinator(TWOPHASE_LOG_URL=coordinator_log_url)
        for name in BANKS:
            if name == RESERVATION_BANK:
                # its prepare log lives in its own database: branches and records share one
                # local transaction, and the faults below hit that path too
                services.start_bank(name, bank_c_db, "reservation", TWOPHASE_LOG_URL=bank_c_db)
            else:
                services.start_bank(name, cfg.pg_url, "postgres")
        services.wait_ready(
            [topology.COORDINATOR_QUEUE, *(topology.participant_queue(b) for b in BANKS)]
        )
        plan = plan_faults(
            rng,
            list(SERVICES),
            list(BANKS),
            kills=cfg.kills,
            kicks=cfg.kicks if cfg.kicks is not None else max(2, cfg.kills // 3),
            crashpoints=cfg.crashpoints,
            broker_restart=cfg.broker_restart,
        )
        # spread over the first 85 % of the load: the rest is load after the last fault
        span = int(cfg.transfers * 0.85)
        thresholds = [span * (k + 1) // (len(plan) + 1) for k in range(len(plan))]
        say(f"{cfg.transfers} transfers, {len(plan)} faults, seed {seed}, data in {cfg.data_dir}")
        key_file, keyring = keys.client("chaos")
        with Client(cfg.amqp_url, connect_attempts=5, key_file=key_file, keyring=keyring) as client:
            load = Load(client, cfg, rng, run_id, accounts)
            injector = FaultInjector(
                services,
                broker,
                plan,
                thresholds,
                load.progress,
                rng,
                crash_loops=cfg.crash_loops,
            )
            fault_log = injector.log
            injector.start()
            reporter = _Reporter(load, injector, say)
            reporter.start()
            watch = _RecoveryWatch(
                Inspector(cfg.pg_url, cfg.data_dir, coordinator_log_url, bank_c_db), injector
            )
            watch.start()
            load_began = time.monotonic()
            try:
                load.run(injector.gate)
                say("load submitted; waiting for the fault plan to finish")
                injector.plan_done.wait(600)
            finally:
                injector.stop()
                injector.join(120)
                reporter.stop()
            result.load_s = time.monotonic() - load_began
            say("waiting for the answers still outstanding")
            answers_began = time.monotonic()
            load.wait_for_answers(cfg.answer_timeout_s)
            result.answers_s = time.monotonic() - answers_began
            client_alive = _client_alive(client)
        say("waiting until quiet")
        inspector = Inspector(cfg.pg_url, cfg.data_dir, coordinator_log_url, bank_c_db)
        try:
            quiet_began = time.monotonic()
            quiet_at, doubt, services_up = _wait_quiet(cfg, services, inspector, fault_log)
            result.quiet_s = time.monotonic() - quiet_began
            watch.halt.set()
            watch.join(30)
            result.in_doubt_at_last_fault = watch.in_doubt_at_start
            if watch.recovery_s is not None:
                result.recovery_s = round(watch.recovery_s, 2)
            elif quiet_at is not None:
                result.recovery_s = round(max(0.0, quiet_at - fault_log.last_restart), 2)
            judge(
                result,
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
        finally:
            inspector.close()
    finally:
        try:
            if injector is not None:
                injector.stop()
                injector.join(120)
        finally:
            try:
                broker.ensure_running()
            finally:
                services.stop_all()
    result.total_s = time.monotonic() - began
    return result


def _client_alive(client: Client) -> bool:
    thread = getattr(client, "_thread", None)
    return thread is None or thread.is_alive()


class _Reporter(threading.Thread):
    def __init__(self, load: Load, injector: FaultInjector, say: Callable[[str], None]) -> None:
        super().__init__(name="twophase-chaos-progress", daemon=True)
        self.load, self.injector, self.say = load, injector, say
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.wait(10):
            faults = sum(v for k, v in self.injector.log.counts.items() if ":" not in k)
            self.say(
                f"{self.load.seen}/{self.load.cfg.transfers} transfers answered or given up,"
                f" {self.injector.started_faults}/{len(self.injector.plan)} faults started"
                f" ({faults} injected)"
            )


class _RecoveryWatch(threading.Thread):
    """The recovery time: from the last restart of the fault plan until everything that was in
    doubt then (unfinished in a log, prepared in PostgreSQL, held in a reservation) is resolved.
    Transactions begun later do not count: the load goes on meanwhile."""

    def __init__(self, inspector: Inspector, injector: FaultInjector) -> None:
        super().__init__(name="twophase-chaos-recovery", daemon=True)
        self.inspector, self.injector = inspector, injector
        self.halt = threading.Event()
        self.in_doubt_at_start: int | None = None
        self.recovery_s: float | None = None

    @staticmethod
    def _ids(doubt: dict[str, list[str]]) -> set[tuple[str, str]]:
        return {(where, x) for where, xs in doubt.items() if where != "held" for x in xs}

    def run(self) -> None:
        try:
            while not self.injector.plan_done.wait(0.2):
                if self.halt.is_set():
                    return
            since = self.injector.log.last_restart
            pending = self._ids(self.inspector.in_doubt())
            self.in_doubt_at_start = len(pending)
            while pending and not self.halt.wait(0.2):
                pending &= self._ids(self.inspector.in_doubt())
            if not pending:
                self.recovery_s = time.monotonic() - since
        except Exception as exc:  # the quiet phase still measures and checks
            self.injector.log.note(f"recovery watch failed: {exc!r}")
        finally:
            self.inspector.close()


def _wait_quiet(
    cfg: ChaosConfig, services: ServiceGroup, inspector: Inspector, fault_log: FaultLog
) -> tuple[float | None, dict[str, list[str]], bool]:
    """Until every service is up and consuming, every queue drained, and nothing in doubt."""
    deadline = time.monotonic() + cfg.quiet_timeout_s
    queues = [topology.COORDINATOR_QUEUE, *(topology.participant_queue(b) for b in BANKS)]
    probe: AmqpChannel | None = None
    doubt: dict[str, list[str]] = {"not checked yet": []}
    services_up = False
    try:
        while True:
            restart_dead_services(services, fault_log)
            waiting: list[str] = []
            try:
                if probe is None:
                    probe = AmqpChannel(cfg.amqp_url, connection_name="chaos-quiet-probe")
                for queue in queues:
                    counts = probe.queue_counts(queue)
                    if counts is None or counts[1] == 0:
                        waiting.append(f"no consumer on {queue}")
                    elif counts[0]:
                        waiting.append(f"{counts[0]} messages ready in {queue}")
            except (ConnectionLost, BrokerUnavailable) as exc:
                waiting.append(f"broker: {exc}")
                if probe is not None:
                    probe.close()
                probe = None
            services_up = not any(w.startswith(("no consumer", "broker")) for w in waiting)
            doubt = inspector.in_doubt()
            if not waiting and not doubt:
                return time.monotonic(), {}, True
            if time.monotonic() > deadline:
                if waiting:
                    doubt["not quiet"] = waiting
                return None, doubt, services_up
            time.sleep(0.25)
    finally:
        if probe is not None:
            probe.close()


# ---- the command ------------------------------------------------------------------------------


def _fresh_vhost(broker_url: str, run_id: str) -> tuple[str, str]:
    vhost = f"twophase-chaos-{run_id}"
    parts = urlsplit(broker_url)
    Broker.ctl("add_vhost", vhost)
    Broker.ctl("set_permissions", "-p", vhost, parts.username or "guest", ".*", ".*", ".*")
    return vhost, urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), "", ""))


def _fresh_database(server_url: str, run_id: str) -> tuple[str, str]:
    name = f"twophase_chaos_{run_id}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        setting = conn.execute("SHOW max_prepared_transactions").fetchone()
        if setting is None or int(setting[0]) == 0:
            raise RuntimeError(
                "PostgreSQL has max_prepared_transactions = 0: ALTER SYSTEM SET "
                "max_prepared_transactions = 200 and restart it"
            )
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(server_url)
    return name, urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def _drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def run_chaos_command(args: argparse.Namespace) -> int:
    import os

    url = config.amqp_url(args.amqp_url)
    try:
        AmqpChannel(url, connection_name="twophase-chaos-probe", connect_attempts=8).close()
    except BrokerUnavailable as exc:
        print(f"twophase chaos: {exc}", file=sys.stderr)
        return 2
    if not Broker.available():
        print(
            "twophase chaos: needs rabbitmqctl on the PATH (run it on the broker's host)",
            file=sys.stderr,
        )
        return 2
    pg_server = args.pg_url or os.environ.get("TWOPHASE_TEST_PG_URL") or DEFAULT_PG_URL
    run_id = uuid.uuid4().hex[:8]
    try:
        db_name, pg_url = _fresh_database(pg_server, run_id)
    except (psycopg.Error, RuntimeError) as exc:
        print(f"twophase chaos: PostgreSQL at {redact_url(pg_server)}: {exc}", file=sys.stderr)
        return 2
    vhost, amqp_url = _fresh_vhost(url, run_id)
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="twophase-chaos-"))

    def say(text: str) -> None:
        print(f"twophase chaos: {text}", file=sys.stderr, flush=True)

    cfg = ChaosConfig(
        amqp_url=amqp_url,
        pg_url=pg_url,
        data_dir=data_dir,
        transfers=args.transfers,
        kills=args.kills,
        kicks=args.kicks,
        concurrency=args.concurrency,
        seed=args.seed,
        broker_restart=not args.no_broker_restart,
        on_progress=say,
    )
    result = run_chaos(cfg)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print_summary(result)
    if result.ok:
        _drop_database(pg_server, db_name)
        Broker.ctl("delete_vhost", vhost, check=False)
    else:
        say(f"kept for inspection: database {db_name}, vhost {vhost}, files in {data_dir}")
    return 0 if result.ok else 1
