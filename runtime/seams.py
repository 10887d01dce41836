"""What a ``BatchDriver`` is given, instead of being subclassed (docs/architecture.md §10).

A driver runs one side's core in its batch loop. It knows nothing of either side: it is handed a
**side**, which owns the core and performs what only that side knows how to do, and optionally
an **observer**, which traces and counts. Both are protocols, generic over the side's

- ``E``: the events its core takes (``coordinator.core.Event``, ``participant.core.Event``;
  each includes ``DriverEvent``, the ones the driver makes),
- ``F``: the effects only that side performs (``LookUp``; ``ExecuteBranch``, ...), and
- ``R``: the log records it writes (``CoordinatorRecord``, ``ParticipantRecord``),

so that mypy checks each side against the core it drives. The effects every core shares
(``CoreEffect``) the driver applies itself.

Two capabilities plug in here and in the driver, nowhere else: authentication in the driver's
``_admit`` (verify before decode; wired, §11), and partition fencing, planned, in
:meth:`Side.write_records`, the one log write of a batch (§10).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from schemas.effects import (
    CancelTimer,
    Forget,
    Incoming,
    Persist,
    ProtocolViolation,
    Send,
    StartTimer,
    TimerFired,
)
from schemas.topology import TRACEPARENT_HEADER

#: the effects both cores return, applied by the driver itself
CoreEffect = Persist | Send | StartTimer | CancelTimer | Forget | ProtocolViolation
#: the events the driver makes itself (a delivery, a timer); every core's ``Event`` has them
DriverEvent = Incoming | TimerFired

E = TypeVar("E")
F = TypeVar("F")
R = TypeVar("R")
E_in = TypeVar("E_in", contravariant=True)
F_in = TypeVar("F_in", contravariant=True)
R_in = TypeVar("R_in", contravariant=True)


class Side(Protocol[E, F, R]):
    """The coordinator's or a participant's part of a driver: its core, its log, its resource."""

    def handle(self, event: DriverEvent | E, now: int) -> Sequence[CoreEffect | F]:
        """Run the core."""
        ...

    def perform(self, effect: F, now: int) -> Iterable[E]:
        """Perform a side-specific effect; the events it produces are handled in this batch."""
        ...

    def settle(self, now: int, unflushed: Sequence[R]) -> Iterable[E]:
        """The batch's events are all handled: do the deferred work (one query, one local
        transaction for the whole batch). ``unflushed`` are the batch's records not yet durable
        (a look-up must see them too). More events may come back; then it is called again."""
        ...

    def write_records(self, records: list[R]) -> None:
        """Make ``records`` durable in one transaction (group commit); called once per batch,
        also with none, before anything of the batch is published. Partition fencing goes here:
        the write checks the epoch in its own transaction and fails the batch otherwise."""
        ...

    def abandon(self) -> None:
        """The turn failed: drop what it staged outside the driver (an open unit of work)."""
        ...

    def reset(self) -> None:
        """Drop every piece of in-memory state; :meth:`recover` rebuilds it from the log."""
        ...

    def recover(self) -> Iterable[E]:
        """Read the log (and the resource); the events that rebuild the core (``Recovered``)."""
        ...

    def reconnected(self, now: int) -> None:
        """The broker connection was lost and is back: what was sent to us meanwhile is lost."""
        ...

    def on_unroutable(self, send: Send) -> Iterable[E]:
        """The broker returned or refused ``send``; events for the core, or none (then the driver
        counts it as an unroutable reply)."""
        ...


class Observer(Protocol[E_in, F_in, R_in]):
    """Tracing and metrics. Called only when a driver is given one: without it, observing
    costs nothing."""

    def on_incoming(self, event: DriverEvent | E_in, now: int) -> None:
        """``event`` is about to be handled by the core."""
        ...

    def on_effect(self, effect: CoreEffect | F_in, now: int) -> None:
        """The core returned ``effect``; it is applied next."""
        ...

    def headers_for(self, send: Send) -> dict[str, str] | None:
        """The AMQP headers ``send`` is published with (:func:`plain_headers` without a trace)."""
        ...

    def on_flushed(self, records: Sequence[R_in], started_ns: int) -> None:
        """``records`` were made durable by one log transaction that started at ``started_ns``."""
        ...

    def on_batch_end(self, messages: int) -> None:
        """The batch of ``messages`` deliveries is done: published, confirmed and acked."""
        ...

    def dead_lettered(self, queue: str, category: str) -> None:
        """A delivery from ``queue`` was refused at the boundary (§9.1)."""
        ...


def plain_headers(send: Send) -> dict[str, str] | None:
    """The headers of ``send`` when nothing traces: its trace context, if it has one."""
    return {TRACEPARENT_HEADER: send.traceparent} if send.traceparent else None


class BatchTrace(Protocol):
    """What both sides' traces offer the driver's batch hooks."""

    def headers_for(self, send: Send) -> dict[str, str] | None: ...
    def on_flushed(self, records: Sequence[Any], started_ns: int) -> None: ...
    def on_batch_end(self) -> None: ...


class BatchCounts(Protocol):
    """What both sides' metrics offer the driver's batch hooks."""

    def on_flushed(self, records: Sequence[Any], started_ns: int) -> None: ...
    def on_batch_end(self, messages: int) -> None: ...
    def dead_lettered(self, queue: str, reason: str) -> None: ...


T = TypeVar("T", bound=BatchTrace)
C = TypeVar("C", bound=BatchCounts)


class BatchObserving(Generic[T, C, R]):
    """The observer hooks both sides forward alike to their trace and metrics, either of which
    may be off; each side's observer adds only what it sees of its own events and effects."""

    def __init__(self, trace: T | None, metrics: C | None) -> None:
        self.trace, self.metrics = trace, metrics

    def headers_for(self, send: Send) -> dict[str, str] | None:
        if self.trace is not None:
            return self.trace.headers_for(send)
        return plain_headers(send)

    def on_flushed(self, records: Sequence[R], started_ns: int) -> None:
        if self.trace is not None:
            self.trace.on_flushed(records, started_ns)
        if self.metrics is not None:
            self.metrics.on_flushed(records, started_ns)

    def on_batch_end(self, messages: int) -> None:
        if self.trace is not None:
            self.trace.on_batch_end()
        if self.metrics is not None:
            self.metrics.on_batch_end(messages)

    def dead_lettered(self, queue: str, category: str) -> None:
        if self.metrics is not None:
            self.metrics.dead_lettered(queue, category)
