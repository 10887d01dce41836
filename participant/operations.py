"""The participant's application API: operations registered by name, and how a handler refuses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

#: ``handler(db, args)``: ``db`` is the resource's handle (a psycopg connection inside the
#: PostgreSQL branch, or a SQLAlchemy connection inside the reservation's local transaction).
Handler = Callable[[Any, dict[str, Any]], None]


class Refuse(Exception):
    """Raise from a handler to vote NO; ``reason`` reaches the client in the aborted outcome."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class OperationSpec:
    """One named operation.

    ``prepare`` does the work and must leave the branch ready to commit: under PostgresResource it
    runs inside the native branch; under ReservationResource it checks and records a hold. The
    ``on_commit``/``on_abort`` hooks are used by ReservationResource only (apply / release a hold);
    they get the same ``args``, re-read from the prepare log after a crash, so they must not rely on
    anything held in memory.
    """

    name: str
    prepare: Handler
    on_commit: Handler | None = None
    on_abort: Handler | None = None


@dataclass
class OperationRegistry:
    operations: dict[str, OperationSpec] = field(default_factory=dict)

    def add(self, spec: OperationSpec) -> None:
        if spec.name in self.operations:
            raise ValueError(f"operation {spec.name!r} is registered twice")
        self.operations[spec.name] = spec

    def get(self, name: str) -> OperationSpec | None:
        return self.operations.get(name)

    def set_hook(
        self, name: str, *, on_commit: Handler | None = None, on_abort: Handler | None = None
    ) -> None:
        spec = self.operations[name]
        if on_commit is not None:
            spec = replace(spec, on_commit=on_commit)
        if on_abort is not None:
            spec = replace(spec, on_abort=on_abort)
        self.operations[name] = spec
