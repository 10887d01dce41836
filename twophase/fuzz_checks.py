"""What ``twophase fuzz`` checks besides the chaos checks, and how it reports.

* ``same_processes``: every service has the PID it had after the warm-up, and is running;
* ``dead_letters``: each hostile message a service must refuse (per
  :func:`twophase.fuzz_corpus.expected_rejection`) is in the dead-letter queue exactly once with
  a reason of its category; nothing a service must take is there; nothing real is there;
* ``no_poison``: no hostile message made a service's handling raise (a ``poison`` dead letter is
  a message that got past the boundary checks and broke a core or a handler);
* ``rss_growth``: each service's RSS at the end is at most 20 % above its RSS after the warm-up;
* ``rows_bounded``: the durable rows whose tx_id is no real transfer's (logs, reservations,
  commit markers), per hostile message and per hostile tx_id.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

from runtime.store import database_url
from twophase.chaos_checks import MAX_LISTED, RESERVATION_BANK, ChaosResult, Check, Inspector
from twophase.chaos_faults import Broker
from twophase.fuzz_traffic import Ledger, PublisherStats, Sent

RSS_GROWTH_MAX = 0.20
#: durable rows per hostile message, on average. Most hostile messages are refused before
#: anything is written; a well-formed one is a transaction (or a question) like any other, a few
#: rows. A service that logged each refusal, or wrote for messages it cannot use, would exceed
#: this at once. (Per tx_id there is no bound: hostile messages may share one, "dup" say, and
#: replays of the services' messages about hostile transactions come back to them.)
ROWS_PER_MESSAGE_MAX = 0.25


_CONNECTION_NAME = re.compile(r'"connection_name","([^"]*)"')


def service_connections(vhost: str) -> dict[str, int]:
    """The services' connections to ``vhost`` (by connection name; heartbeat connections are
    their own) and when each was opened, in epoch milliseconds (the newest of a name)."""
    out = Broker.ctl(
        "list_connections", "client_properties", "connected_at", "vhost", "-q", "--no-table-headers"
    )
    found: dict[str, int] = {}
    for line in out.splitlines():
        columns = line.split("\t")
        name = _CONNECTION_NAME.search(columns[0]) if len(columns) == 3 else None
        if name is None or columns[2] != vhost or not columns[1].isdigit():
            continue
        if name.group(1).startswith(("twophase-coordinator", "twophase-bank-")):
            found[name.group(1)] = max(found.get(name.group(1), 0), int(columns[1]))
    return found


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class FuzzResult:
    base: ChaosResult
    messages: int = 0
    warmup_s: float = 0.0
    flood_s: float = 0.0
    total_s: float = 0.0
    rss_warm: dict[str, int] = field(default_factory=dict)
    rss_peak: dict[str, int] = field(default_factory=dict)
    rss_end: dict[str, int] = field(default_factory=dict)
    pids_warm: dict[str, int] = field(default_factory=dict)
    pids_end: dict[str, int] = field(default_factory=dict)
    exits: dict[str, int | None] = field(default_factory=dict)
    #: queue depths when a service stopped consuming and the flood was cut short
    stalled: dict[str, int] = field(default_factory=dict)
    #: connections of the harness the broker dropped (the run was not undisturbed)
    disturbances: list[str] = field(default_factory=list)
    #: the services' broker connections (name -> opened at, epoch ms) after the warm-up and at
    #: the end: one opened since is a reconnect
    connections_warm: dict[str, int] = field(default_factory=dict)
    connections_end: dict[str, int] = field(default_factory=dict)
    sent: dict[str, Any] = field(default_factory=dict)
    dead: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.base.ok

    @property
    def checks(self) -> list[Check]:
        return self.base.checks

    def as_dict(self) -> dict[str, Any]:
        base = self.base.as_dict()
        return {
            "ok": self.ok,
            "messages": self.messages,
            "transfers": base["transfers"],
            "committed": base["committed"],
            "aborted": base["aborted"],
            "unknown": base["unknown"],
            "warmup_s": round(self.warmup_s, 1),
            "flood_s": round(self.flood_s, 1),
            "total_s": round(self.total_s, 1),
            # published and consumed (the flood ends when the queues are empty again)
            "hostile_per_s": (
                round(self.sent.get("messages", 0) / self.flood_s, 1)
                if self.flood_s >= 1 and not self.stalled
                else None
            ),
            "sent": self.sent,
            "dead_letters": self.dead,
            "rows": self.rows,
            "rss_kib": {"warm": self.rss_warm, "peak": self.rss_peak, "end": self.rss_end},
            "pids": {"warm": self.pids_warm, "end": self.pids_end},
            "stalled": self.stalled,
            "connections": {"warm": self.connections_warm, "end": self.connections_end},
            "disturbances": self.disturbances,
            "abort_reasons": base["abort_reasons"],
            "total_before": base["total_before"],
            "total_after": base["total_after"],
            "checks": base["checks"],
            "seed": base["seed"],
            "data_dir": base["data_dir"],
        }


def fuzz_checks(
    result: FuzzResult,
    ledger: Ledger,
    stats: PublisherStats,
    inspector: Inspector,
    real: set[str],
) -> None:
    checks = result.base.checks
    result.sent = {
        "messages": stats.sent,
        "bytes": stats.bytes,
        "replays": stats.replays,
        "paused_s": round(stats.paused_s, 1),
        "by_kind": dict(stats.by_kind.most_common()),
        "by_queue": dict(stats.by_queue.most_common()),
        "expected": dict(stats.by_expected.most_common()),
        "refused_by_broker": dict(stats.broker_refused),
    }

    moved = sorted(n for n, pid in result.pids_warm.items() if result.pids_end.get(n) != pid)
    gone = {n: code for n, code in result.exits.items() if code is not None}
    checks.append(
        Check(
            "same_processes",
            not moved and not gone and bool(result.pids_end),
            f"restarted: {moved}; exited: {gone}"
            if moved or gone
            else f"{len(result.pids_end)} services, each with its PID of after the warm-up",
        )
    )
    checks.append(
        Check(
            "flood_consumed",
            not result.stalled,
            f"the flood stopped after {stats.sent} messages: a queue got no shorter for a minute: "
            f"{result.stalled}"
            if result.stalled
            else f"{stats.sent} hostile messages published, every service kept consuming",
        )
    )
    checks.append(
        Check(
            "broker_steady",
            not result.disturbances,
            "; ".join(result.disturbances[:3])
            + " (the dead-letter accounting cannot be trusted across a broker restart)"
            if result.disturbances
            else "no connection of the harness was dropped",
        )
    )
    renewed = sorted(
        name
        for name, opened in result.connections_end.items()
        if opened > result.connections_warm.get(name, 0)
    )
    # each service's own connection must be there at both moments (heartbeats have their own)
    required = {f"twophase-{name}" for name in result.pids_warm}
    expected = set(result.connections_warm) | required
    missing = sorted(
        (required - set(result.connections_warm)) | (expected - set(result.connections_end))
    )
    checks.append(
        Check(
            "no_reconnects",
            not renewed and not missing and bool(result.connections_end),
            f"connections opened again after the warm-up: {renewed}; gone: {missing}"
            if renewed or missing
            else f"{len(result.connections_end)} service connections, each the one it had "
            "after the warm-up",
        )
    )
    checks.extend(_dead_letter_checks(result, ledger))

    grown = {
        n: (result.rss_warm.get(n, 0), kib)
        for n, kib in result.rss_end.items()
        if not kib or kib > result.rss_warm.get(n, 0) * (1 + RSS_GROWTH_MAX)
    }
    shown = ", ".join(
        f"{n} {result.rss_warm.get(n, 0) // 1024}->{kib // 1024} MiB"
        f" (peak {result.rss_peak.get(n, kib) // 1024})"
        for n, kib in result.rss_end.items()
    )
    checks.append(
        Check(
            "rss_growth",
            not grown,
            (f"grew more than {RSS_GROWTH_MAX:.0%}: " if grown else "") + shown,
        )
    )

    by_tx, where = hostile_rows(inspector, real)
    total = sum(by_tx.values())
    per_message = total / max(1, stats.sent)
    worst = by_tx.most_common(3)
    result.rows = {
        "hostile_commits": getattr(inspector, "hostile_commits", []),
        "hostile_rows": total,
        "per_hostile_message": round(per_message, 4),
        "hostile_tx_ids_with_rows": len(by_tx),
        "max_per_tx": worst[0][1] if worst else 0,
        "worst": [f"{t[:40]}: {n}" for t, n in worst],
        "by_where": dict(where.most_common()),
    }
    checks.append(
        Check(
            "rows_bounded",
            per_message <= ROWS_PER_MESSAGE_MAX,
            f"{total} rows of non-real tx_ids for {stats.sent} hostile messages "
            f"({per_message:.3f} per message, at most {ROWS_PER_MESSAGE_MAX}; most for one "
            f"tx_id: {', '.join(result.rows['worst'])}); "
            + ", ".join(f"{k} {v}" for k, v in where.most_common()),
        )
    )


def _dead_letter_checks(result: FuzzResult, ledger: Ledger) -> list[Check]:
    with ledger.lock:
        sent = list(ledger.sent.values())
        dead = {n: list(r) for n, r in ledger.dead.items()}
        foreign, foreign_count = list(ledger.foreign), ledger.foreign_count
    expected: Counter[str] = Counter()
    found: Counter[str] = Counter()
    problems: list[str] = []
    poison: list[str] = []
    client_dead = 0
    for s in sent:
        reasons = dead.get(s.number, [])
        categories = [r.partition(": ")[0] for r in reasons]
        found.update(categories)
        poison += [
            f"#{s.number} {s.kind} to {s.queue}: {_shown(s, r)}"
            for r in reasons
            if r.startswith("poison")
        ]
        if s.client:
            client_dead += len(reasons)
            continue
        if s.expected:
            expected[s.expected] += 1
        wrong = _mismatch(s, reasons, categories)
        if wrong:
            problems.append(wrong)
    problems += [
        f"a real message dead-lettered from {q}: {r[:150]} {b[:60]!r}" for q, r, b in foreign
    ]
    if foreign_count > len(foreign):
        problems.append(f"(+{foreign_count - len(foreign)} more real messages dead-lettered)")
    result.dead = {
        "total": ledger.dead_total,
        "expected": dict(expected.most_common()),
        "found": dict(found.most_common()),
        "mismatches": len(problems),
        "foreign": foreign_count,
        "client_queue": client_dead,
        "examples": problems[:MAX_LISTED],
    }
    refused = sum(expected.values())
    return [
        Check(
            "dead_letters",
            not problems,
            "; ".join(problems[:MAX_LISTED])
            + (f" (+{len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else "")
            if problems
            else f"{refused} refused, each dead-lettered once with its category ("
            + ", ".join(f"{k} {v}" for k, v in expected.most_common())
            + f"); {len(sent) - refused} taken or sent to the client, none dead-lettered",
        ),
        Check(
            "no_poison",
            not poison,
            "; ".join(poison[:MAX_LISTED])
            if poison
            else "no hostile message made a handler or a core raise",
        ),
    ]


def _mismatch(s: Sent, reasons: list[str], categories: list[str]) -> str | None:
    if s.expected is None and reasons:
        return f"#{s.number} ({s.kind}) to {s.queue} was to be taken, got {_shown(s, reasons[0])}"
    if s.expected is not None and not reasons:
        return f"#{s.number} ({s.kind}, {s.headers_kind}) to {s.queue}: no dead letter, " + (
            f"expected {s.expected}: {s.preview[:60]!r}"
        )
    if s.expected is not None and categories != [s.expected]:
        return f"#{s.number} ({s.kind}) to {s.queue}: expected {s.expected}, got {reasons}"
    return None


def _shown(s: Sent, reason: str) -> str:
    return f"{reason[:160]} [{s.size} bytes: {s.preview[:60]!r}]"


def hostile_rows(inspector: Inspector, real: set[str]) -> tuple[Counter[str], Counter[str]]:
    """Durable rows of tx_ids no real transfer has: by tx_id, and by where they are."""
    by_tx: Counter[str] = Counter()
    where: Counter[str] = Counter()

    def count(name: str, rows: Any) -> None:
        for tx_id, n in rows:
            if tx_id not in real:
                by_tx[tx_id] += n
                where[name] += n

    logs = {"coordinator log": inspector.decision_log.log}
    logs.update({f"{n} log": p.log for n, p in inspector.prepare_logs.items()})
    for name, log in logs.items():
        query = sa.select(log.table.c.tx_id, sa.func.count()).group_by(log.table.c.tx_id)
        with log.engine.connect() as conn:
            count(name, conn.execute(query).all())
    engine = sa.create_engine(database_url(inspector.bank_urls[RESERVATION_BANK]))
    try:
        with engine.connect() as conn:
            count(
                "reservations",
                conn.execute(
                    sa.text("SELECT tx_id, COUNT(*) FROM twophase_reservation GROUP BY tx_id")
                ).all(),
            )
    finally:
        engine.dispose()
    with psycopg.connect(inspector.pg_url) as pg:
        count(
            "commit markers",
            pg.execute("SELECT tx_id, COUNT(*) FROM twophase_commit_marker GROUP BY tx_id"),
        )
    return by_tx, where


def print_report(result: FuzzResult) -> None:
    from rich.console import Console
    from rich.table import Table

    data = result.as_dict()
    console = Console()
    table = Table(title="twophase fuzz: the chaos bank under hostile messages", show_lines=False)
    table.add_column("figure")
    table.add_column("value", overflow="fold")
    sent = data["sent"]
    rows = [
        (
            "hostile messages",
            f"{sent['messages']} ({sent['bytes'] / 1e6:.1f} MB), "
            f"{sent['replays']} replays; flood {data['flood_s']} s, {data['hostile_per_s']}/s",
        ),
        ("by generator", _pairs(sent["by_kind"])),
        ("by queue", _pairs(sent["by_queue"])),
        ("expected", _pairs(sent["expected"])),
        (
            "dead letters",
            f"{data['dead_letters']['total']}: {_pairs(data['dead_letters']['found'])}",
        ),
        (
            "real transfers",
            f"{data['transfers']}: committed {data['committed']}, "
            f"aborted {data['aborted']}, unknown {data['unknown']}",
        ),
        ("aborts", _pairs(data["abort_reasons"]) or "none"),
        ("balance", f"{data['total_before']} -> {data['total_after']}"),
        (
            "rows",
            f"{data['rows'].get('hostile_rows')} for hostile input "
            f"({data['rows'].get('per_hostile_message')} per message)",
        ),
        (
            "hostile commits",
            f"{len(data['rows'].get('hostile_commits', []))} hostile transactions committed by"
            " the coordinator (on votes forged by other hostile messages)",
        ),
        (
            "RSS MiB",
            ", ".join(
                f"{n} {w // 1024}->{result.rss_end.get(n, 0) // 1024}"
                for n, w in result.rss_warm.items()
            ),
        ),
        (
            "time",
            f"warm-up {data['warmup_s']} s, flood {data['flood_s']} s, total {data['total_s']} s",
        ),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    for check in result.checks:
        mark = "[green]ok[/green]" if check.ok else "[red]FAIL[/red]"
        table.add_row(f"{mark} {check.name}", check.detail[:600])
    table.add_row("verdict", "[green]PASS[/green]" if result.ok else "[red]FAIL[/red]")
    console.print(table)
    console.print(f"seed {data['seed']}, files in {data['data_dir']}")


def _pairs(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())
