"""The chaos bank (issue 3): three banks keep every transfer atomic under fire.

A coordinator and three bank participants (two on native PostgreSQL branches, one on a SQLite
reservation) run as separate processes while ``twophase.chaos`` kills them with SIGKILL at random,
restarts each with every named crash point armed in turn, closes their AMQP connections and
restarts the whole RabbitMQ node once. At quiescence the run's checks must all hold: balances,
atomicity at every bank, one decision per transaction, the client's answers honoured, nothing in
doubt, no prepared PostgreSQL branch left.

The broker restart disturbs everything else on this broker: the suite runs serially, and this is
the only test that does it. ``TWOPHASE_CHAOS_SEED`` replays a run's load and fault plan.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from runtime.crashpoints import NAMES
from twophase.chaos import ChaosConfig, print_summary, run_chaos

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]

TRANSFERS = 4000
KILLS = 15


def test_the_bank_stays_consistent_under_kills_crash_points_and_a_broker_restart(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    if shutil.which("rabbitmq-server") is None:
        message = "the chaos test restarts the broker: it needs rabbitmq-server on this host"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    seed = int(os.environ.get("TWOPHASE_CHAOS_SEED") or random.randrange(2**31))
    result = run_chaos(
        ChaosConfig(
            amqp_url=amqp_url,
            pg_url=pg_url,
            data_dir=tmp_path / "chaos",
            transfers=TRANSFERS,
            kills=KILLS,
            concurrency=16,
            seed=seed,
        )
    )
    print_summary(result)  # shown with -s / -rA
    report = json.dumps({**result.as_dict(), "events": result.fault_events}, indent=1)

    # the faults really happened
    assert result.faults.get("sigkill") == KILLS, report
    assert result.faults.get("broker_restart") == 1, report
    assert result.faults.get("connection_kick", 0) >= 1, report
    assert sorted(result.crashpoints_fired) == sorted(NAMES), report
    # and there was something to protect: money moved, and some transfers were refused
    assert result.committed > 0 and result.aborted > 0, report
    assert result.one_phase > 0, report  # single-branch transactions ran in one phase
    assert result.decided_commit >= result.committed, report

    failed = [f"{c.name}: {c.detail}" for c in result.failed()]
    assert not failed, "\n".join(failed) + "\n" + report
    assert result.ok
    assert result.recovery_s is not None
