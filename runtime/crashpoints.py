"""Named crash points: ``TWOPHASE_CRASHPOINTS=name[:probability],...`` makes the process exit.

The drivers call :func:`crashpoint` at every boundary between persisting, publishing and acking.
When the variable is unset the call is one dictionary lookup on an empty dict. The acks of a
batch leave with the next poll (:meth:`runtime.amqp.AmqpChannel.ack`), so ``*.after_ack`` dies
with them still queued and the batch is redelivered; a crash anywhere in the next turn comes
after they left.
"""

from __future__ import annotations

import os
import random
import sys

ENV = "TWOPHASE_CRASHPOINTS"

#: every name a driver passes to :func:`crashpoint`, so that the chaos test can aim at each one
NAMES = (
    "coordinator.after_persist",
    "coordinator.after_publish",
    "coordinator.after_ack",
    "participant.after_prepare",
    "participant.after_persist",
    "participant.after_publish",
    "participant.after_commit",
    "participant.after_ack",
)


def parse(spec: str) -> dict[str, float]:
    points: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, probability = item.partition(":")
        if name not in NAMES:
            raise ValueError(f"{ENV}: unknown crash point {name!r}; known: {', '.join(NAMES)}")
        try:
            points[name] = float(probability) if probability else 1.0
        except ValueError:
            raise ValueError(f"{ENV}: {item!r}: probability must be a number in [0, 1]") from None
    return points


_armed: dict[str, float] = parse(os.environ.get(ENV, ""))


def arm(spec: str) -> None:
    """Replace the armed crash points (tests call this; processes read the environment)."""
    _armed.clear()
    _armed.update(parse(spec))


def crashpoint(name: str) -> None:
    if not _armed:
        return
    probability = _armed.get(name)
    if probability is not None and random.random() < probability:
        sys.stderr.write(f"twophase: crash point {name} reached: exiting\n")
        sys.stderr.flush()
        os._exit(86)
