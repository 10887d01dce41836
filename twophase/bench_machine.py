"""Machine-wide figures for ``twophase bench``: how busy the cores were during the measured
window, and what the broker and the database spent when they run on this machine.

Each service reports its own CPU (``runtime.selfstats``); these figures add what the services
cannot see: the cores left idle, and RabbitMQ (``beam.smp``) and PostgreSQL (every ``postgres``
process: backends, WAL writer, checkpointer). Read from ``/proc``: on a system without it, or for
a broker or database on another machine, the figures are left out rather than guessed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: process name (``comm``) -> the name the figures use
SERVERS = {"beam.smp": "rabbitmq", "postgres": "postgresql"}

Snapshot = dict[str, Any]


def snapshot(proc: Path = Path("/proc")) -> Snapshot:
    """Cumulative CPU seconds so far: every core's busy and total time, and per server process
    (by pid, so a process that starts during the window counts from zero)."""
    try:
        first = (proc / "stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal: idle and iowait are not busy
    times = [int(value) for value in first[1:9]]
    servers: dict[str, dict[int, float]] = {name: {} for name in SERVERS.values()}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it exited meanwhile
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        server = SERVERS.get(comm)
        if server is not None:
            fields = stat[stat.rfind(")") + 2 :].split()
            servers[server][int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return {
        "busy_s": (sum(times) - times[3] - times[4]) / ticks,
        "total_s": sum(times) / ticks,
        "cores": os.cpu_count() or 1,
        "servers": servers,
    }


def summarize(before: Snapshot, after: Snapshot, transactions: int) -> dict[str, Any]:
    """Busy share of all cores, busy CPU per transaction, and each local server's CPU per
    transaction; empty when ``/proc`` could not be read."""
    if not before or not after:
        return {}
    done = max(transactions, 1)
    elapsed = after["total_s"] - before["total_s"]
    busy = after["busy_s"] - before["busy_s"]
    figures: dict[str, Any] = {
        "cores": after["cores"],
        "cpu_busy_percent": round(100 * busy / elapsed, 1) if elapsed > 0 else 0.0,
        "cpu_ms_per_tx": round(1000 * busy / done, 3),
    }
    for server, pids in after["servers"].items():
        if not pids:
            continue  # not on this machine
        earlier = before["servers"].get(server, {})
        spent = sum(seconds - earlier.get(pid, 0.0) for pid, seconds in pids.items())
        figures[f"{server}_cpu_ms_per_tx"] = round(1000 * spent / done, 3)
    return figures
