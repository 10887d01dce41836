"""``twophase bench`` end to end, on the real broker and PostgreSQL: what it reports, and that
stopping it stops its services. Speed is not asserted here (a benchmark reports figures)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def bench_command(amqp_url: str, pg_url: str, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "twophase",
        "bench",
        "--participants",
        "2",
        "--amqp-url",
        amqp_url,
        "--pg-url",
        pg_url,
        "--no-baselines",
        *options,
    ]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_a_short_run_reports_its_figures(amqp_url: str, pg_url: str) -> None:
    command = bench_command(amqp_url, pg_url, "--duration", "2", "--warmup", "0.5", "--json")
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["committed_per_s"] > 0
    assert result["aborted_per_s"] == 0
    assert result["unknown"] == 0
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["protocol_messages_per_tx"] >= 4 * 2 + 2 - 0.5  # 4N+2, N = 2 participants
    for name in ("coordinator", "bench-1", "bench-2"):
        figures = result["processes"][name]
        assert figures["cpu_ms_per_tx"] > 0
        assert set(figures["turn_ms_per_batch"]) == {"handle", "flush", "publish", "ack"}
    machine = result["machine"]  # Linux: the cores, and the local broker and database
    assert 0 < machine["cpu_busy_percent"] <= 100
    assert machine["cpu_ms_per_tx"] > 0
    assert machine["rabbitmq_cpu_ms_per_tx"] > 0
    assert machine["postgresql_cpu_ms_per_tx"] > 0


def test_sigterm_stops_the_services_it_started(amqp_url: str, pg_url: str) -> None:
    bench = subprocess.Popen(
        bench_command(amqp_url, pg_url, "--duration", "60", "--json"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    services: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(services) < 3 and time.monotonic() < deadline:  # coordinator + 2 banks
            time.sleep(0.2)
            services = children_of(bench.pid)
        assert len(services) >= 3, "the bench did not start its services"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in services) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in services if alive(pid)]
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for pid in services:  # only the processes this bench started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
