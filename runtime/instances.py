"""One instance per service name: a second coordinator, or a second participant of the same name,
is refused at start (docs/architecture.md §11.2).

Two instances consuming one queue would each serve part of its messages from their own memory:
a participant's second copy once left its reservations prepared while the transactions ended
(issue 14). The guard is the broker's: before it recovers from its log, a service declares its
lock (``twophase.lock.<queue>``, schemas.topology.lock_queue) as an exclusive queue of its
connection, which RabbitMQ refuses to any other connection (RESOURCE_LOCKED) and deletes when
the holder's connection goes, for classic and quorum protocol queues alike. The broker cannot
say who holds it, so the holder writes who it is in its log database (``twophase_instances``),
where a second instance sharing that database reads it to name the first in its one line.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Protocol

import sqlalchemy as sa

from runtime.errors import InstanceRunning
from schemas import topology

_metadata = sa.MetaData()
INSTANCES = sa.Table(
    "twophase_instances",
    _metadata,
    sa.Column("service", sa.String(200), primary_key=True),
    sa.Column("holder", sa.String(300), nullable=False),
)


class Lockable(Protocol):
    def hold(self, lock: str) -> None: ...


def this_instance() -> str:
    """Who this process is, as an operator would look for it."""
    since = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{socket.gethostname()} pid {os.getpid()}, started {since}"


def holder(engine: sa.Engine, service: str) -> str | None:
    """Who last said it serves ``service`` from this database, if anyone did."""
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sa.select(INSTANCES.c.holder).where(INSTANCES.c.service == service)
            ).scalar()
    except sa.exc.SQLAlchemyError:  # no table yet, or no answer: the line names no one
        return None
    # a row anyone with the database could write: one line, bounded, whatever it holds
    return None if found is None else " ".join(str(found).split())[:300]


def claim(engine: sa.Engine, service: str, who: str) -> None:
    try:
        _metadata.create_all(engine, checkfirst=True)
    except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
        # services sharing a database start together: another made the table meanwhile
        # (PostgreSQL refuses the second CREATE TABLE with a unique or duplicate-table error)
        if not sa.inspect(engine).has_table(INSTANCES.name):
            raise
    with engine.begin() as conn:
        conn.execute(sa.delete(INSTANCES).where(INSTANCES.c.service == service))
        conn.execute(sa.insert(INSTANCES).values(service=service, holder=who[:300]))


def serve_alone(channel: Lockable, queue: str, engine: sa.Engine, service: str) -> None:
    """Hold the lock of the service that consumes ``queue`` and write this instance into
    ``engine``'s database; InstanceRunning (one line, naming the last instance that started on
    this database when it has one) if another instance holds it."""
    try:
        channel.hold(topology.lock_queue(queue))
    except InstanceRunning:
        first: str | None = holder(engine, service) or ""
    else:
        first = None
    if first is not None:
        named = f" (last started on this log by {first})" if first else ""
        raise InstanceRunning(
            f"{service} is already running{named}: {topology.lock_queue(queue)} is held by "
            "another connection; stop that instance first (one instance per name)"
        )
    claim(engine, service, this_instance())
