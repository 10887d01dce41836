"""Whether the coordinator starts a transaction at all: its shape, and its participants' liveness.

Pure, like the rest of the core: the liveness table and the time come in as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas import topology
from schemas.messages import Begin, Heartbeat


@dataclass(frozen=True)
class CoordinatorSettings:
    liveness_timeout_ms: int = 3_000
    resend_initial_ms: int = 500
    resend_max_ms: int = 30_000
    min_timeout_ms: int = 10
    max_timeout_ms: int = 600_000
    max_branches: int = 64
    #: a transaction with one branch commits in one round (``Prepare.one_phase``)
    one_phase: bool = True
    #: participants whose heartbeats are remembered at most: beyond it, heartbeats from names
    #: not yet known are ignored until silent ones are forgotten (made-up names cannot grow
    #: the table without bound)
    max_tracked_participants: int = 10_000


@dataclass
class Liveness:
    last_seen_ms: int
    interval_ms: int


def record_heartbeat(
    settings: CoordinatorSettings, liveness: dict[str, Liveness], beat: Heartbeat, now_ms: int
) -> None:
    """Remember ``beat``; when the table is full, forget participants that count as down."""
    name = beat.participant
    if name not in liveness and len(liveness) >= settings.max_tracked_participants:
        for silent in [p for p, seen in liveness.items() if _silent(settings, seen, now_ms)]:
            del liveness[silent]
        if len(liveness) >= settings.max_tracked_participants:
            return
    liveness[name] = Liveness(now_ms, beat.interval_ms)


def _silent(settings: CoordinatorSettings, seen: Liveness, now_ms: int) -> bool:
    return now_ms - seen.last_seen_ms > max(settings.liveness_timeout_ms, 3 * seen.interval_ms)


def refusal(
    settings: CoordinatorSettings,
    liveness: dict[str, Liveness],
    started_ms: int,
    begin: Begin,
    now_ms: int,
) -> tuple[str, str | None] | None:
    """(reason, participant at fault) when ``begin`` cannot succeed; None when it may."""
    if not begin.branches:
        return "the transaction has no branches", None
    if len(begin.branches) > settings.max_branches:
        return f"too many branches ({len(begin.branches)} > {settings.max_branches})", None
    if not settings.min_timeout_ms <= begin.timeout_ms <= settings.max_timeout_ms:
        return (
            f"timeout {begin.timeout_ms} ms is outside "
            f"[{settings.min_timeout_ms}, {settings.max_timeout_ms}] ms",
            None,
        )
    seen: set[str] = set()
    for branch in begin.branches:
        name = branch.participant
        if not topology.is_valid_participant_name(name):
            return f"invalid participant name {name!r}", name
        if name in seen:
            return f"participant {name!r} appears twice: combine its work into one operation", name
        seen.add(name)
        down = down_reason(settings, liveness, started_ms, name, now_ms)
        if down is not None:
            return down, name
    return None


def down_reason(
    settings: CoordinatorSettings,
    liveness: dict[str, Liveness],
    started_ms: int,
    name: str,
    now_ms: int,
) -> str | None:
    timeout = settings.liveness_timeout_ms
    seen = liveness.get(name)
    if seen is None:
        if now_ms - started_ms < timeout:
            return None  # just started: heartbeats may not have arrived yet
        return f"unknown participant {name!r}: no heartbeat received from it"
    silence = now_ms - seen.last_seen_ms
    # silence from before the coordinator could listen (start, reconnect) is not theirs
    listened = now_ms - max(seen.last_seen_ms, started_ms)
    if listened > max(timeout, 3 * seen.interval_ms):
        return f"participant {name!r} is down: last heartbeat {silence / 1000:.1f} s ago"
    return None
