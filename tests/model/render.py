"""How the explorer shows a failing trace: one line per step, messages and records in short."""

from __future__ import annotations

from typing import Any

import msgspec

from coordinator.core import HistoryLoaded
from coordinator.core import Recovered as CoordinatorRecovered
from participant import core as pc
from schemas import effects as fx


def render(trace: Any) -> list[str]:
    lines = []
    while trace is not None:
        trace, line = trace
        if isinstance(line, tuple) and isinstance(line[-1], list):  # (label, effects)
            line = f"{show(line[0])}  =>  {show(line[1])}"
        lines.append(show(line))
    return lines[::-1]


def show(x: Any) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, tuple | list):
        text = ("" if isinstance(x, tuple) else ", ").join(map(show, x))
        return text if isinstance(x, tuple) else f"[{text}]"
    if isinstance(x, fx.Send):
        return f"Send({x.queue.rsplit('.', 1)[-1]}: {show(x.message)})"
    if isinstance(x, fx.Persist):
        return f"Persist({show(x.record)}{', forced' if x.force else ''})"
    if isinstance(x, msgspec.Struct):
        shown = [(k, getattr(v, "value", v)) for k, v in msgspec.structs.asdict(x).items() if v]
        return f"{type(x).__name__}({' '.join(f'{k}={v}' for k, v in shown if k in _SHOWN)})"
    if isinstance(x, HistoryLoaded):
        return f"HistoryLoaded({x.tx_id}: {show(x.records)})"
    return type(x).__name__ if isinstance(x, CoordinatorRecovered | pc.Recovered) else repr(x)


_SHOWN = {"tx_id", "participant", "vote", "outcome", "decision", "at_fault", "deadline_ms"}
