"""The benchmark's report helpers: percentiles, the latency-against-load plot, the machine's
figures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from twophase import bench_machine
from twophase.bench_report import percentile, plot_sweep


def test_percentile_picks_nearest_rank() -> None:
    samples = sorted(float(n) for n in range(1, 101))
    assert percentile(samples, 50) == pytest.approx(50.0, abs=1.0)
    assert percentile(samples, 99) == pytest.approx(99.0, abs=1.0)
    assert percentile(samples, 100) == 100.0


def test_plot_sweep_writes_a_png(tmp_path: Path) -> None:
    points = [
        {"offered_per_s": rate, "p50_ms": rate / 10, "p99_ms": rate / 5, "committed_per_s": rate}
        for rate in (50, 150, 250)
    ]
    target = tmp_path / "sweep.png"
    plot_sweep(points, str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_bench_database_keeps_the_servers_query_options() -> None:
    from sqlalchemy.engine import make_url

    from twophase.bench import _on_database

    moved = make_url(_on_database("postgresql://postgres@/postgres?host=/var/run/postgresql", "b1"))
    assert (moved.database, moved.query["host"], moved.host) == ("b1", "/var/run/postgresql", None)
    tcp = "postgresql://postgres:pw@127.0.0.1:5432/postgres"
    assert _on_database(tcp, "b2") == "postgresql://postgres:pw@127.0.0.1:5432/b2"


def test_the_default_server_is_the_local_socket_when_there_is_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twophase import bench

    monkeypatch.setattr(bench, "LOCAL_PG_SOCKET", tmp_path / ".s.PGSQL.5432")
    assert bench.default_pg_url() == "postgresql://postgres@127.0.0.1:5432/postgres"
    (tmp_path / ".s.PGSQL.5432").touch()
    assert bench.default_pg_url() == f"postgresql://postgres@/postgres?host={tmp_path}"


def test_machine_figures_are_deltas_over_the_window(tmp_path: Path) -> None:
    def fake_proc(busy: int, idle: int, beam: int, backends: dict[int, int]) -> Path:
        root = tmp_path / f"proc-{busy}"
        root.mkdir()
        (root / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
        servers = {7: ("beam.smp", beam)} | {pid: ("postgres", t) for pid, t in backends.items()}
        for pid, (comm, ticks) in servers.items():
            (root / str(pid)).mkdir()
            fields = ["S"] + ["0"] * 10 + [str(ticks), "0"] + ["0"] * 30
            (root / str(pid) / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields))
        (root / "self").mkdir()  # not a process directory
        return root

    ticks = os.sysconf("SC_CLK_TCK")
    before = bench_machine.snapshot(fake_proc(100 * ticks, 100 * ticks, 10 * ticks, {8: ticks}))
    after = bench_machine.snapshot(
        fake_proc(130 * ticks, 110 * ticks, 16 * ticks, {8: 3 * ticks, 9: 2 * ticks})
    )
    figures = bench_machine.summarize(before, after, 1000)
    assert figures["cpu_busy_percent"] == 75.0  # 30 s busy of 40 s
    assert figures["cpu_ms_per_tx"] == 30.0
    assert figures["rabbitmq_cpu_ms_per_tx"] == 6.0
    assert figures["postgresql_cpu_ms_per_tx"] == 4.0  # a backend new in the window counts whole
    assert bench_machine.summarize({}, after, 1000) == {}
