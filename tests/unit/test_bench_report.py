"""The benchmark's report helpers: percentiles and the latency-against-load plot."""

from __future__ import annotations

from pathlib import Path

import pytest

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
