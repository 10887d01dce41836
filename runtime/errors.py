"""Every error twophase raises on purpose, under one root; the standard library only.

The root, :class:`TwophaseError`, and :class:`ProtocolError` (the contract's errors:
:class:`schemas.codec.DecodeError`, :class:`schemas.validation.InvalidMessage`) are defined in
:mod:`schemas.errors`, the lowest floor, and are importable from here too; every other error is
defined here, so that a module that only raises or catches one (``config``, ``logs``,
``metrics``, the CLI) imports neither pika nor a database driver to get it::

    TwophaseError
    ├── ProtocolError                      schemas.errors
    │   ├── DecodeError                    schemas.codec
    │   └── InvalidMessage (ValueError)    schemas.validation
    ├── ConfigurationError
    │   └── LogMissing
    ├── BrokerUnavailable
    ├── ConnectionLost
    ├── PublishError
    ├── PublishRefused (ValueError)
    ├── ResourceError
    ├── ResourceUnavailable (ConnectionError)
    ├── UnknownOperation (RuntimeError)
    ├── HeuristicHazard
    ├── CoordinatorRunning
    ├── Fenced
    ├── UnknownTransaction
    ├── OutcomeUnknown (TimeoutError)
    ├── LimitExceeded (ValueError)
    └── ClientClosed (RuntimeError)

The tools' own errors are under the root too: ``twophase.processes.ServiceError`` and
``twophase.chaos_faults.BrokerError`` (both a ``RuntimeError`` as well).

A second base in brackets is the built-in error the class was before it had the root, kept so
that code catching that one (``except ValueError``, ``except ConnectionError``) still does: an
outage is recognised as a ``ConnectionError`` (:mod:`runtime.outages`), and the client's errors
are documented as a ``TimeoutError`` and a ``ValueError``.

Not errors, and so not here: a participant's NO vote (:class:`participant.operations.Refuse`,
which a handler raises) and a core's ``ProtocolViolation`` (a value the core returns).
"""

from __future__ import annotations

from collections.abc import Sequence

from schemas.errors import ProtocolError, TwophaseError

__all__ = [
    "BrokerUnavailable",
    "ClientClosed",
    "ConfigurationError",
    "ConnectionLost",
    "CoordinatorRunning",
    "Fenced",
    "HeuristicHazard",
    "InstanceRunning",
    "LimitExceeded",
    "LogMissing",
    "OutcomeUnknown",
    "ProtocolError",
    "PublishError",
    "PublishRefused",
    "ResourceError",
    "ResourceUnavailable",
    "TwophaseError",
    "UnknownOperation",
    "UnknownTransaction",
]


# ---- settings ------------------------------------------------------------------------------


class ConfigurationError(TwophaseError):
    """A setting is wrong; the message is one line that says what to fix."""


class LogMissing(ConfigurationError):
    """The log asked for does not exist (see :func:`runtime.store.open_existing`)."""


class InstanceRunning(ConfigurationError):
    """Another instance of this service already consumes its queue: a second one must not
    start (both would serve the same name, each from its own memory)."""


# ---- RabbitMQ (runtime.amqp) ---------------------------------------------------------------


class BrokerUnavailable(TwophaseError):
    """The broker could not be reached (after all connection attempts)."""


class ConnectionLost(TwophaseError):
    """The connection or channel died; call :meth:`runtime.amqp.AmqpChannel.reconnect`."""


class PublishRefused(TwophaseError, ValueError):
    """This one publish cannot be sent (say, a routing key longer than AMQP allows); the
    connection is fine."""


class PublishError(TwophaseError):
    """Some publishes were nacked by the broker or returned as unroutable."""

    def __init__(self, routing_keys: Sequence[str]) -> None:
        self.routing_keys = list(routing_keys)
        super().__init__(
            f"{len(self.routing_keys)} publish(es) nacked or unroutable: "
            + ", ".join(sorted(set(self.routing_keys)))
        )


# ---- participants (participant.resources, participant.worker, participant.admin) ----------


class ResourceError(TwophaseError):
    """The resource is misconfigured or hit a heuristic outcome; the message says what to fix."""


class ResourceUnavailable(TwophaseError, ConnectionError):
    """The resource's database did not answer: an outage (see :mod:`runtime.outages`), not a
    NO vote. The worker waits for the database and redoes the batch."""


class UnknownOperation(TwophaseError, RuntimeError):
    """A logged branch names an operation the participant no longer registers (it was prepared
    by an older version of the service that had it); the branch cannot be finished."""


class HeuristicHazard(TwophaseError):
    """The requested resolution contradicts a logged decision; nothing was changed."""


# ---- the coordinator's operator tools (coordinator.admin) ----------------------------------


class CoordinatorRunning(TwophaseError):
    """The coordinator consumes its queue: it decides by itself, resolution by hand is refused."""


class UnknownTransaction(TwophaseError):
    """The log has no record of the ``tx_id``; nothing was changed (``force`` overrides)."""


# ---- partition leases (runtime.leases) ----------------------------------------------------


class Fenced(TwophaseError):
    """A fenced log write was refused: the partition's lease row no longer holds the writer's
    epoch (another instance acquired it since), or its owner released it. Nothing was written in
    that transaction. Not an outage (:mod:`runtime.outages` never retries it): the writer stops
    serving the partition and publishes nothing that follows from the write (rule L6,
    docs/architecture.md §12.1); it serves it again only by acquiring it anew and recovering."""

    def __init__(
        self, partition: int, epoch: int, current: int | None, owner: str | None = None
    ) -> None:
        self.partition = partition
        self.epoch = epoch
        self.current = current
        self.owner = owner
        if current is None:
            now = "it has no lease row"
        elif current == epoch:
            now = "it was released"
        else:
            now = f"it is at epoch {current}, owner {owner or 'none'}"
        super().__init__(
            f"partition {partition}: the lease is no longer at epoch {epoch} ({now}); "
            "stop serving it"
        )


# ---- the client (coordinator.client) -------------------------------------------------------


class OutcomeUnknown(TwophaseError, TimeoutError):
    """No outcome arrived in time. The transaction may still finish: ask ``status(tx_id)``."""

    def __init__(self, tx_id: str, waited_s: float) -> None:
        super().__init__(f"no outcome for transaction {tx_id} after {waited_s:.1f} s")
        self.tx_id = tx_id


class LimitExceeded(TwophaseError, ValueError):
    """The coordinator would refuse this transaction or query (dead-letter it unanswered), so it
    was not sent; the message says which limit. See :class:`schemas.validation.Limits`."""


class ClientClosed(TwophaseError, RuntimeError):
    """The client is closed (or closing): nothing more is sent, and what was waiting fails."""
