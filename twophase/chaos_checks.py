"""What ``twophase chaos`` checks once the system is quiet, and how it reports it.

The truth of each transaction is read where it lives, never from what the client was told: the
coordinator's decision log (COMMITTING, ABORTED, or nothing: presumed abort), each bank's
resource (``committed(tx_ids)``: the commit marker of a native PostgreSQL branch, the state of a
reservation), each participant's prepare log, the accounts tables and ``pg_prepared_xacts``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

from coordinator.log import DecisionLog
from participant.log import PrepareLog
from participant.reservation import ReservationResource
from participant.resources import PostgresResource
from runtime.store import database_url
from schemas.codec import decode_participant_record
from schemas.messages import Branch
from schemas.records import BranchCompleted, Decision
from twophase import bank
from twophase.chaos_faults import FaultLog

PG_BANKS = ("bank-a", "bank-b")
RESERVATION_BANK = "bank-c"
BANKS = (*PG_BANKS, RESERVATION_BANK)
MAX_LISTED = 10  # tx ids quoted per failed check


@dataclass
class Transfer:
    tx_id: str
    legs: tuple[tuple[str, str, str, int], ...]  # (bank, operation, account, amount)
    started: float = 0.0
    seen: str = "pending"  # what the client saw in time: committed | aborted | unknown
    final: str = ""  # the answer eventually received (also after "unknown"), or ""
    reason: str = ""

    def branches(self) -> list[Branch]:
        return [Branch(b, op, {"account": acc, "amount": amt}) for b, op, acc, amt in self.legs]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


@dataclass
class ChaosResult:
    transfers: int = 0
    #: of which single-branch deposits and withdrawals (committed in one phase)
    one_phase: int = 0
    committed: int = 0
    aborted: int = 0
    unknown: int = 0
    late_answers: int = 0
    unanswered: int = 0
    decided_commit: int = 0
    decided_abort: int = 0
    no_decision: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    crashpoints_fired: list[str] = field(default_factory=list)
    crashpoints_missed: list[str] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    broker_restart_s: float | None = None
    recovery_s: float | None = None
    in_doubt_at_last_fault: int | None = None
    load_s: float = 0.0
    answers_s: float = 0.0  # waiting for answers after the load
    quiet_s: float = 0.0  # waiting for quiescence after that
    total_s: float = 0.0
    total_before: int = 0
    total_after: int = 0
    abort_reasons: dict[str, int] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    fault_events: list[str] = field(default_factory=list)
    seed: int = 0
    data_dir: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "transfers": self.transfers,
            "one_phase": self.one_phase,
            "committed": self.committed,
            "aborted": self.aborted,
            "unknown": self.unknown,
            "late_answers": self.late_answers,
            "unanswered": self.unanswered,
            "decided": {
                "commit": self.decided_commit,
                "abort": self.decided_abort,
                "none": self.no_decision,
            },
            "faults": self.faults,
            "crashpoints_fired": self.crashpoints_fired,
            "crashpoints_missed": self.crashpoints_missed,
            "unexpected_exits": len(self.unexpected_exits),
            "broker_restart_s": self.broker_restart_s,
            "recovery_s": self.recovery_s,
            "in_doubt_at_last_fault": self.in_doubt_at_last_fault,
            "load_s": round(self.load_s, 1),
            "answers_s": round(self.answers_s, 1),
            "quiet_s": round(self.quiet_s, 1),
            "total_s": round(self.total_s, 1),
            "total_before": self.total_before,
            "total_after": self.total_after,
            "abort_reasons": self.abort_reasons,
            "checks": {c.name: c.as_dict() for c in self.checks},
            "seed": self.seed,
            "data_dir": self.data_dir,
        }


# ---- reading the system's state ---------------------------------------------------------------


class Inspector:
    """Read-only views of the logs, resources and databases of the run."""

    def __init__(
        self, pg_url: str, data_dir: Path, coordinator_log_url: str, bank_c_db: str
    ) -> None:
        self.pg_url = pg_url
        self.decision_log = DecisionLog(coordinator_log_url)
        self.prepare_logs = {
            name: PrepareLog(
                bank_c_db if name == RESERVATION_BANK else str(data_dir / f"{name}.log.db"), name
            )
            for name in BANKS
        }
        self.resources: dict[str, Any] = {}
        for name in PG_BANKS:
            pg = PostgresResource(pg_url)
            pg.bind(name)
            self.resources[name] = pg
        reservation = ReservationResource(bank_c_db)
        reservation.bind(RESERVATION_BANK)
        self.resources[RESERVATION_BANK] = reservation
        self.bank_urls = {name: pg_url for name in PG_BANKS}
        self.bank_urls[RESERVATION_BANK] = bank_c_db

    def close(self) -> None:
        self.decision_log.close()
        for log in self.prepare_logs.values():
            log.close()
        for resource in self.resources.values():
            resource.close()

    def prepared_xacts(self) -> list[str]:
        with psycopg.connect(self.pg_url) as conn:
            rows = conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchall()
        return sorted(r[0] for r in rows)

    def held(self) -> dict[str, int]:
        return {name: bank.totals(url, name)[1] for name, url in self.bank_urls.items()}

    def total(self) -> int:
        return sum(bank.totals(url, name)[0] for name, url in self.bank_urls.items())

    def balances(self) -> dict[tuple[str, str], int]:
        found = {}
        for name, url in self.bank_urls.items():
            engine = sa.create_engine(database_url(url))
            try:
                with engine.connect() as conn:
                    rows = conn.execute(sa.text(f"SELECT id, balance FROM {bank.table_name(name)}"))
                    found.update({(name, str(r[0])): int(r[1]) for r in rows})
            finally:
                engine.dispose()
        return found

    def reservations_prepared(self) -> list[str]:
        return sorted(self.resources[RESERVATION_BANK].prepared())

    def in_doubt(self) -> dict[str, list[str]]:
        """Everything still undecided or unfinished, by where it is (empty when quiet)."""
        doubt: dict[str, list[str]] = {}
        unfinished = sorted(self.decision_log.unfinished_transactions())
        if unfinished:
            doubt["coordinator log"] = unfinished
        for name, log in self.prepare_logs.items():
            branches = sorted(b.tx_id for b in log.unfinished_branches())
            if branches:
                doubt[f"{name} log"] = branches
        xacts = self.prepared_xacts()
        if xacts:
            doubt["pg_prepared_xacts"] = xacts
        reserved = self.reservations_prepared()
        if reserved:
            doubt[f"{RESERVATION_BANK} reservations"] = reserved
        held = {k: v for k, v in self.held().items() if v}
        if held:
            doubt["held"] = [f"{k}: {v}" for k, v in held.items()]
        return doubt

    def decisions(self) -> tuple[dict[str, str], list[str]]:
        """tx_id -> commit | abort from the coordinator's log; and tx ids logged both ways."""
        table = self.decision_log.log.table
        kinds: dict[str, set[str]] = {}
        with self.decision_log.log.engine.connect() as conn:
            for tx_id, kind in conn.execute(sa.select(table.c.tx_id, table.c.kind)):
                kinds.setdefault(tx_id, set()).add(kind)
        decided, both = {}, []
        for tx_id, seen in kinds.items():
            if "committing" in seen and "aborted" in seen:
                both.append(tx_id)
            if "committing" in seen:
                decided[tx_id] = "commit"
            elif "aborted" in seen:
                decided[tx_id] = "abort"
        return decided, sorted(both)

    def participant_log_decisions(self, name: str) -> dict[str, set[Decision]]:
        log = self.prepare_logs[name].log
        table = log.table
        found: dict[str, set[Decision]] = {}
        with log.engine.connect() as conn:
            query = sa.select(table.c.tx_id, table.c.body).where(table.c.kind == "completed")
            for tx_id, body in conn.execute(query):
                record = decode_participant_record(bytes(body))
                assert isinstance(record, BranchCompleted)
                found.setdefault(tx_id, set()).add(record.decision)
        return found

    def committed_at(self, name: str, tx_ids: list[str]) -> set[str]:
        """What the bank's resource says is committed, asked through ``committed(tx_ids)``."""
        found: set[str] = set()
        for start in range(0, len(tx_ids), 500):
            found |= self.resources[name].committed(tx_ids[start : start + 500])
        return found

    def every_commit_at(self, name: str) -> set[str]:
        """Every tx id the bank holds as committed, also ones nobody submitted."""
        if name in PG_BANKS:
            with psycopg.connect(self.pg_url) as conn:
                markers = conn.execute(
                    "SELECT tx_id FROM twophase_commit_marker WHERE participant = %s", (name,)
                ).fetchall()
            return {str(r[0]) for r in markers}
        query = "SELECT tx_id FROM twophase_reservation WHERE participant = :p AND state = :s"
        engine = sa.create_engine(database_url(self.bank_urls[name]))
        try:
            with engine.connect() as sa_conn:
                rows = sa_conn.execute(sa.text(query), {"p": name, "s": "committed"}).all()
        finally:
            engine.dispose()
        return {str(r[0]) for r in rows}


def _sample(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    more = f" (+{len(ids) - MAX_LISTED} more)" if len(ids) > MAX_LISTED else ""
    return ", ".join(ids[:MAX_LISTED]) + more


def judge(
    result: ChaosResult,
    transfers: dict[str, Transfer],
    abort_reasons: Counter[str],
    client_errors: list[str],
    inspector: Inspector,
    opening: dict[tuple[str, str], int],
    doubt: dict[str, list[str]],
    services_up: bool,
    client_alive: bool,
    fault_log: FaultLog,
) -> None:
    """Fill ``result`` in: the counts, and one :class:`Check` per property of the run."""
    tx_ids = sorted(transfers)
    checks = result.checks
    result.one_phase = sum(len(t.legs) == 1 for t in transfers.values())
    result.committed = sum(t.seen == "committed" for t in transfers.values())
    result.aborted = sum(t.seen == "aborted" for t in transfers.values())
    result.unknown = sum(t.seen == "unknown" for t in transfers.values())
    result.late_answers = sum(t.seen == "unknown" and bool(t.final) for t in transfers.values())
    result.unanswered = sum(not t.final for t in transfers.values())
    result.abort_reasons = dict(abort_reasons.most_common())
    result.faults = {k: v for k, v in sorted(fault_log.counts.items())}
    result.crashpoints_fired = list(fault_log.crashpoints_fired)
    result.crashpoints_missed = list(fault_log.crashpoints_missed)
    result.unexpected_exits = list(fault_log.unexpected_exits)
    result.broker_restart_s = fault_log.broker_restart_s
    result.fault_events = list(fault_log.events)

    # -- quiet, nothing in doubt ---------------------------------------------------------------
    if doubt:
        detail = "; ".join(f"{where}: {_sample(what)}" for where, what in doubt.items())
        checks.append(Check("nothing_in_doubt", False, f"not quiet after the wait: {detail}"))
    else:
        checks.append(
            Check(
                "nothing_in_doubt",
                True,
                "no unfinished log entry, prepared branch, held reservation or queued message",
            )
        )
    xacts = inspector.prepared_xacts()
    checks.append(
        Check(
            "no_prepared_xacts",
            not xacts,
            f"pg_prepared_xacts: {_sample(xacts)}" if xacts else "pg_prepared_xacts is empty",
        )
    )

    # -- the coordinator's decisions -----------------------------------------------------------
    decided, both = inspector.decisions()
    foreign = sorted(set(decided) - set(transfers))
    result.decided_commit = sum(decided.get(t) == "commit" for t in tx_ids)
    result.decided_abort = sum(decided.get(t) == "abort" for t in tx_ids)
    result.no_decision = sum(t not in decided for t in tx_ids)
    problems = []
    if both:
        problems.append(f"logged both COMMITTING and ABORTED: {_sample(both)}")
    if foreign:
        problems.append(f"decisions for transactions nobody submitted: {_sample(foreign)}")
    checks.append(
        Check(
            "decisions_unique",
            not problems,
            "; ".join(problems) or "every transaction has at most one decision in the log",
        )
    )

    # -- every bank agrees with the decision (atomicity) -----------------------------------------
    committed_at = {name: inspector.committed_at(name, tx_ids) for name in BANKS}
    partial: list[str] = []
    against: list[str] = []
    for tx_id in tx_ids:
        legs = [leg[0] for leg in transfers[tx_id].legs]
        yes = [b for b in legs if tx_id in committed_at[b]]
        decision = decided.get(tx_id, "none")
        if decision == "commit" and len(yes) != len(legs):
            missing = [b for b in legs if b not in yes]
            partial.append(f"{tx_id} committed by the coordinator, not at {'/'.join(missing)}")
        elif decision != "commit" and yes:
            against.append(f"{tx_id} ({decision}) committed at {'/'.join(yes)}")
        for name in BANKS:  # a bank that committed a branch it was never asked for
            if name not in legs and tx_id in committed_at[name]:
                against.append(f"{tx_id} committed at {name}, which had no branch")
    for name in BANKS:
        strangers = inspector.every_commit_at(name) - set(transfers)
        if strangers:
            against.append(f"{name} committed transactions nobody submitted: {_sample(strangers)}")
    bad = partial + against
    checks.append(
        Check(
            "atomicity",
            not bad,
            "; ".join(bad[:MAX_LISTED])
            + (f" (+{len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else "")
            if bad
            else f"{result.decided_commit} committed at every bank they name, the others at none",
        )
    )

    # -- the participants' logs agree with the decision ----------------------------------------
    disagree = []
    for name in BANKS:
        for tx_id, decisions in inspector.participant_log_decisions(name).items():
            want = Decision.COMMIT if decided.get(tx_id) == "commit" else Decision.ABORT
            if decisions != {want}:
                shown = "+".join(sorted(d.value for d in decisions))
                disagree.append(f"{name} log says {shown} for {tx_id} (coordinator: {want.value})")
    checks.append(
        Check(
            "participant_logs_agree",
            not disagree,
            "; ".join(disagree[:MAX_LISTED]) or "every completed branch matches the decision",
        )
    )

    # -- what the client was told --------------------------------------------------------------
    told_bad = []
    for tx_id in tx_ids:
        transfer = transfers[tx_id]
        legs = [leg[0] for leg in transfer.legs]
        applied = [b for b in legs if tx_id in committed_at[b]]
        if transfer.final == "committed":
            if decided.get(tx_id) != "commit" or len(applied) != len(legs):
                told_bad.append(
                    f"{tx_id}: client told committed, coordinator {decided.get(tx_id, 'none')},"
                    f" applied at {'/'.join(applied) or 'no bank'}"
                )
        elif transfer.final == "aborted" and (decided.get(tx_id) != "abort" or applied):
            told_bad.append(
                f"{tx_id}: client told aborted ({transfer.reason[:80]}), coordinator"
                f" {decided.get(tx_id, 'no record')}, applied at {'/'.join(applied) or 'none'}"
            )
    checks.append(
        Check(
            "client_outcomes_hold",
            not told_bad,
            "; ".join(told_bad[:MAX_LISTED])
            or f"{result.committed + result.aborted + result.late_answers} answers, "
            "each durable and applied as told",
        )
    )
    checks.append(
        Check(
            "every_transfer_answered",
            result.unanswered == 0 and client_alive,
            ("" if client_alive else "the client's I/O thread died; ")
            + (
                f"{result.unanswered} transfers never answered after re-sending: "
                + _sample(t for t in tx_ids if not transfers[t].final)
                if result.unanswered
                else "every transfer got an answer (some after the client gave up waiting)"
            )
            + (f"; client errors: {client_errors[:3]}" if client_errors else ""),
        )
    )

    # -- money ---------------------------------------------------------------------------------
    balances = inspector.balances()
    result.total_after = sum(balances.values())
    expected = dict(opening)
    for tx_id in tx_ids:
        if decided.get(tx_id) == "commit":
            for b, op, account, amount in transfers[tx_id].legs:
                expected[(b, account)] += -amount if op == "debit" else amount
    wrong = [
        f"{b}/{a}: {balances.get((b, a))} != expected {v}"
        for (b, a), v in sorted(expected.items())
        if balances.get((b, a)) != v
    ]
    # deposits and withdrawals (one branch, one phase) change the total by what they committed
    balanced = result.total_after == sum(expected.values())
    checks.append(
        Check(
            "balances",
            balanced and not wrong,
            f"total {result.total_before} -> {result.total_after}"
            + ("; " if balanced else f" != {sum(expected.values())} committed; ")
            + (
                f"{len(wrong)} accounts differ from opening + committed transfers: "
                + "; ".join(wrong[:MAX_LISTED])
                if wrong
                else "every account = opening balance + its committed transfers and deposits,"
                " each once"
            ),
        )
    )

    # -- the run itself --------------------------------------------------------------------
    checks.append(
        Check(
            "services_survived",
            services_up and not fault_log.unexpected_exits and not fault_log.errors,
            "; ".join(
                [
                    *(e.replace("\n", " | ")[:600] for e in fault_log.unexpected_exits),
                    *fault_log.errors,
                ]
            )
            or "no service exited except when killed or at an armed crash point",
        )
    )


def print_summary(result: ChaosResult) -> None:
    faults = ", ".join(f"{k} {v}" for k, v in result.faults.items() if ":" not in k) or "none"
    kills = ", ".join(
        f"{k.split(':', 1)[1]} {v}" for k, v in result.faults.items() if k.startswith("sigkill:")
    )
    lines = [
        "twophase chaos: three banks (2 x PostgreSQL branches, 1 x SQLite reservation)",
        f"  transfers         {result.transfers} in {result.load_s:.1f} s (seed {result.seed});"
        f" {result.one_phase} of one branch (one phase)",
        f"  client saw        committed {result.committed}, aborted {result.aborted}, "
        f"unknown {result.unknown} (answered later: {result.late_answers}, "
        f"never: {result.unanswered})",
        f"  coordinator log   commit {result.decided_commit}, abort {result.decided_abort}, "
        f"no decision {result.no_decision}",
        f"  faults            {faults}",
        f"  SIGKILLs          {kills or 'none'}",
        f"  crash points      fired {len(result.crashpoints_fired)}: "
        f"{', '.join(result.crashpoints_fired) or '-'}"
        + (
            f"; not reached: {', '.join(result.crashpoints_missed)}"
            if result.crashpoints_missed
            else ""
        ),
        f"  broker restart    {result.broker_restart_s} s"
        if result.broker_restart_s
        else "  broker restart    none",
        f"  recovery          {result.recovery_s} s from the last restart until the"
        f" {result.in_doubt_at_last_fault} entries then in doubt were resolved"
        if result.recovery_s is not None
        else "  recovery          NOT QUIET",
        f"  balance           {result.total_before} -> {result.total_after}",
        "  aborts            "
        + (", ".join(f"{k} {v}" for k, v in list(result.abort_reasons.items())[:5]) or "none"),
        "  checks",
    ]
    for c in result.checks:
        lines.append(f"    {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    lines.append("  verdict           " + ("PASS" if result.ok else "FAIL"))
    lines.append(f"  data              {result.data_dir}")
    print("\n".join(lines))
