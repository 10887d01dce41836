"""Tables and plots of ``twophase bench`` results."""

from __future__ import annotations

import statistics
from typing import IO, Any


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1 or q >= 100:
        return max(values)
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def print_table(result: dict[str, Any], out: IO[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out)
    setup = result["setup"]
    table = Table(
        title=(
            f"twophase bench: {setup['participants']} participants, {setup['resource']} resources, "
            f"{setup['log']} logs, {setup['mode']}, {setup['duration_s']:.0f} s"
            # results written before --auth existed have no such key
            + (f", authentication {setup['auth']}" if "auth" in setup else "")
        )
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in (
        "committed_per_s",
        "aborted_per_s",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "messages_per_tx",
        "protocol_messages_per_tx",
        "forced_writes_per_tx",
        "unknown",
    ):
        table.add_row(key, str(result[key]))
    for name, figures in result["processes"].items():
        table.add_row(
            f"{name}: CPU ms/tx, peak RSS MiB",
            f"{figures['cpu_ms_per_tx']}, {figures['peak_rss_mib']}",
        )
        steps = figures.get("turn_ms_per_batch")
        if steps:
            table.add_row(
                f"{name}: turns/tx; ms per turn: " + " ".join(steps),
                f"{figures['batches_per_tx']}; " + " ".join(f"{v:.2f}" for v in steps.values()),
            )
    for key, value in result.get("machine", {}).items():
        table.add_row(f"machine: {key}", str(value))
    for key, value in result.get("baselines", {}).items():
        table.add_row(f"baseline: {key}", str(value))
    console.print(table)


def plot_sweep(points: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        from runtime.errors import ConfigurationError

        raise ConfigurationError("--plot needs matplotlib: pip install 'twophase[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offered = [p["offered_per_s"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(offered, [p["p50_ms"] for p in points], marker="o", label="p50")
    ax.plot(offered, [p["p99_ms"] for p in points], marker="o", label="p99")
    ax.set_xlabel("offered load (transactions/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    twin = ax.twinx()
    twin.plot(
        offered,
        [p["committed_per_s"] for p in points],
        color="grey",
        linestyle="--",
        label="committed/s",
    )
    twin.set_ylabel("committed transactions/s")
    ax.legend(loc="upper left")
    ax.set_title("twophase: latency against offered load (open loop)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
