"""One instance per service name: a second coordinator, or a second participant of the same name,
is refused at start (docs/architecture.md §11.2).

Two instances consuming one queue would each serve part of its messages from their own memory:
a participant's second copy once left its reservations prepared while the transactions ended
(issue 14). The guard is the broker's: the service consumes its queue as the only consumer
(``basic.consume`` exclusive), before it recovers from its log, so a second instance stops before
it reads or changes anything. The broker cannot say who holds the queue, so the holder writes
who it is in its log database (``twophase_instances``), where a second instance sharing that
database reads it to name the first in its one line.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Protocol

import sqlalchemy as sa

from runtime.errors import InstanceRunning

_metadata = sa.MetaData()
INSTANCES = sa.Table(
    "twophase_instances",
    _metadata,
    sa.Column("service", sa.String(200), primary_key=True),
    sa.Column("holder", sa.String(300), nullable=False),
)


class ExclusiveConsumer(Protocol):
    def consume(self, queue: str, *, exclusive: bool = False) -> None: ...


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
    return None if found is None else str(found)


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


def serve_alone(channel: ExclusiveConsumer, queue: str, engine: sa.Engine, service: str) -> None:
    """Consume ``queue`` as its only consumer and write this instance into ``engine``'s
    database; InstanceRunning (one line, naming the first instance when its database says who)
    if another instance consumes it."""
    try:
        channel.consume(queue, exclusive=True)
    except InstanceRunning:
        first: str | None = holder(engine, service) or ""
    else:
        first = None
    if first is not None:
        named = f" ({first})" if first else ""
        raise InstanceRunning(
            f"{service} is already running{named}: {queue} has a consumer; stop that instance "
            "first (one instance per name)"
        )
    claim(engine, service, this_instance())
