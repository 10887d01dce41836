"""Outages of a dependency (RabbitMQ, a log database, a resource database), and waiting them out.

A service never ends because PostgreSQL or RabbitMQ went away: it notices, logs one line naming
the dependency (URL redacted), reports ``twophase_dependency_up{dependency} 0``, waits with
back-off until the dependency answers again, logs one line, and goes on. Every retry in the
project uses the policies here (tenacity), so back-off and logging are the same everywhere.

What counts as an outage is decided by the exception's type, through its chain of causes: a
connection that is refused, dropped or timed out, a server shutting down, a pool with no
connection to give. Anything else (a bug, a poison message) is not waited for.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
import sqlalchemy.exc
import tenacity
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from runtime.errors import BrokerUnavailable, ConnectionLost, Fenced
from runtime.redaction import redact_url

log = logging.getLogger("twophase.outages")

#: back-off between attempts to reach a dependency that is down: 0.1 s doubling to 5 s, jittered
INITIAL_WAIT_S = 0.1
MAX_WAIT_S = 5.0

_OUTAGE_TYPES: tuple[type[BaseException], ...] = (
    ConnectionLost,
    BrokerUnavailable,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    sqlalchemy.exc.TimeoutError,  # no pooled connection within the pool's timeout
    psycopg.OperationalError,
    psycopg.InterfaceError,
    sqlite3.OperationalError,  # locked or unreadable database file
    ConnectionError,
    TimeoutError,
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def outage_cause(exc: BaseException) -> str | None:
    """One line naming the outage behind ``exc``, or None when ``exc`` is not an outage.

    An error the server answered with (a SQLSTATE) is an outage only when it says the server
    is going away, refuses connections or lacks resources: a lock timeout or a constraint is an
    answer, and waiting would not change it. So is :class:`~runtime.errors.Fenced` (a lease lost,
    rule L6), even when raised while an outage was being handled (its context is not looked at).
    """
    for link in _chain(exc):
        if isinstance(link, Fenced):
            return None
        if isinstance(link, sqlalchemy.exc.DBAPIError) and link.connection_invalidated:
            return one_line(link)
        sqlstate = getattr(getattr(link, "orig", None) or link, "sqlstate", None)
        if sqlstate is not None:
            return one_line(link) if _server_gone(sqlstate) else None
        if isinstance(link, _OUTAGE_TYPES):
            return one_line(link)
    return None


def _server_gone(sqlstate: str) -> bool:
    return sqlstate.startswith(("08", "53", "57P")) or sqlstate == "3D000"


def is_outage(exc: BaseException) -> bool:
    return outage_cause(exc) is not None


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, with URLs redacted (drivers quote them)."""
    cause: BaseException = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    text = redact_url(lines[0]) if lines else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def backoff(max_wait: float = MAX_WAIT_S) -> tenacity.wait.wait_base:
    """The wait between attempts to reach a dependency that is down."""
    initial = min(INITIAL_WAIT_S, max_wait)
    return tenacity.wait_exponential(multiplier=initial, max=max_wait) + tenacity.wait_random(
        0, initial
    )


def retrying(
    *,
    stop: tenacity.stop.stop_base | None = None,
    until: threading.Event | None = None,
    what: str = "",
    max_wait: float = MAX_WAIT_S,
) -> tenacity.Retrying:
    """Retry on outages only, with :func:`backoff`; forever unless ``stop``, or until ``until``
    is set. Each retry is logged at DEBUG (the loss and the return are logged once, by
    :class:`DependencyWatch`)."""
    stops: tenacity.stop.stop_base = stop or tenacity.stop_never
    if until is not None:
        stops = stops | tenacity.stop_when_event_set(until)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        log.debug(
            "%s failed (attempt %d: %s); retrying in %.1f s",
            what or "an attempt",
            state.attempt_number,
            one_line(error) if error is not None else "?",
            state.next_action.sleep if state.next_action is not None else 0.0,
        )

    return tenacity.Retrying(
        stop=stops,
        wait=backoff(max_wait),
        retry=tenacity.retry_if_exception(is_outage),
        before_sleep=before_sleep,
        reraise=True,
    )


@dataclass(frozen=True)
class Dependency:
    """Something a service needs: ``probe()`` returns when it answers, raises when it does not."""

    name: str
    url: str
    probe: Callable[[], None]


#: one gauge per registry, as runtime.metrics keeps its families: keyed weakly, since the id of
#: a registry that is gone may come back as another's
_gauges: weakref.WeakKeyDictionary[CollectorRegistry, Gauge] = weakref.WeakKeyDictionary()
_gauges_lock = threading.Lock()


def _gauge(registry: CollectorRegistry | None) -> Gauge:
    target = registry if registry is not None else REGISTRY
    with _gauges_lock:
        gauge = _gauges.get(target)
        if gauge is None:
            gauge = Gauge(
                "twophase_dependency_up",
                "1 while the dependency answers, 0 during an outage",
                ["dependency"],
                registry=target,
            )
            _gauges[target] = gauge
        return gauge


class DependencyWatch:
    """The dependencies of one service: which are down since when, logged and reported."""

    def __init__(
        self,
        service: str,
        dependencies: list[Dependency],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.service = service
        self.dependencies = dependencies
        self._down_since: dict[str, float] = {}
        self._gauge = _gauge(registry)
        for dependency in dependencies:
            self.report_up(dependency)

    def report_up(self, dependency: Dependency) -> None:
        """Report ``dependency`` as up without a probe (it is known to answer)."""
        self._gauge.labels(dependency.name).set(1)

    @property
    def down(self) -> list[str]:
        return sorted(self._down_since)

    def lost(self, dependency: Dependency, cause: str) -> None:
        if dependency.name in self._down_since:
            return
        self._down_since[dependency.name] = time.monotonic()
        self._gauge.labels(dependency.name).set(0)
        log.warning(
            "%s: lost %s at %s (%s); waiting for it with back-off",
            self.service,
            dependency.name,
            redact_url(dependency.url),
            cause,
        )

    def regained(self, dependency: Dependency) -> None:
        since = self._down_since.pop(dependency.name, None)
        if since is None:
            return
        self._gauge.labels(dependency.name).set(1)
        log.warning(
            "%s: %s at %s is back after %.1f s",
            self.service,
            dependency.name,
            redact_url(dependency.url),
            time.monotonic() - since,
        )

    def probe_all(self) -> None:
        """Probe every dependency; mark each down or up; raise the first outage found."""
        first: BaseException | None = None
        for dependency in self.dependencies:
            try:
                dependency.probe()
            except Exception as exc:
                cause = outage_cause(exc)
                if cause is None:
                    raise
                self.lost(dependency, cause)
                first = first or exc
            else:
                self.regained(dependency)
        if first is not None:
            raise first

    def wait_until_up(self, until: threading.Event | None = None) -> None:
        """Return once every dependency answers (or ``until`` is set)."""
        for attempt in retrying(until=until, what=f"{self.service}: probing its dependencies"):
            with attempt:
                self.probe_all()


def describe(dependencies: list[Dependency]) -> str:
    """For a ``ready`` log line: ``log at sqlite:///..., resource at postgresql://u:***@...``."""
    return ", ".join(f"{d.name} at {redact_url(d.url)}" for d in dependencies)
