"""The participant library: ``Participant``, ``Refuse`` and the resources.

The names are loaded lazily so that importing ``participant.core`` (the pure protocol core) does
not pull in pika, SQLAlchemy or psycopg.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Participant": "participant.worker",
    "Refuse": "participant.operations",
    "OperationSpec": "participant.operations",
    "PostgresResource": "participant.resources",
    "ReservationResource": "participant.reservation",
    "Resource": "participant.resources",
    "ResourceError": "runtime.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'participant' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
