"""The participant's application API: operations registered by name, and how a handler refuses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

#: ``handler(db, args)``: ``db`` is the resource's handle (a psycopg connection inside the
#: PostgreSQL branch, or a SQLAlchemy connection inside the reservation's local transaction).
Handler = Callable[[Any, dict[str, Any]], None]
#: ``hook(db, [args, ...])``: a commit or abort hook for many branches of one operation at once
BatchHook = Callable[[Any, list[dict[str, Any]]], None]
#: ``handler(db, [args, ...]) -> [refusal or None, ...]``: prepare many branches at once; a
#: refused branch must leave nothing behind (the others stay in the same transaction)
BatchHandler = Callable[[Any, list[dict[str, Any]]], "list[Refuse | None]"]


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
    #: batch forms of the hooks: one call for every branch of this operation that a batch
    #: finishes (in the order given); preferred over the single forms when both are set
    on_commit_many: BatchHook | None = None
    on_abort_many: BatchHook | None = None
    #: ReservationResource: the batch form of ``prepare``, used on a batch's first attempt (an
    #: attempt that fails is redone branch by branch with ``prepare``)
    prepare_many: BatchHandler | None = None

    def hook(self, commit: bool) -> BatchHook | None:
        """The commit (or abort) hook as a batch hook, whichever form was registered."""
        many = self.on_commit_many if commit else self.on_abort_many
        if many is not None:
            return many
        single = self.on_commit if commit else self.on_abort
        if single is None:
            return None

        def each(db: Any, args_list: list[dict[str, Any]]) -> None:
            for args in args_list:
                single(db, args)

        return each


@dataclass
class OperationRegistry:
    operations: dict[str, OperationSpec] = field(default_factory=dict)

    def add(self, spec: OperationSpec) -> None:
        if spec.name in self.operations:
            raise ValueError(f"operation {spec.name!r} is registered twice")
        self.operations[spec.name] = spec

    def get(self, name: str) -> OperationSpec | None:
        return self.operations.get(name)

    def set_hook(self, name: str, **hooks: Handler | BatchHook | BatchHandler) -> None:
        """Set ``on_commit``, ``on_abort``, ``on_commit_many``, ``on_abort_many`` or
        ``prepare_many``."""
        self.operations[name] = replace(self.operations[name], **hooks)  # type: ignore[arg-type]
