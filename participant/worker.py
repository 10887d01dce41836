"""The participant library: register operations, then run the worker (thread or foreground).

bank = Participant("bank-a", ReservationResource("sqlite:///bank-a.db"))

@bank.operation("debit")
def debit(db, args): ...              # check and hold; raise Refuse("...") to vote NO

@debit.on_commit
def apply_debit(db, args): ...        # ReservationResource only: apply the hold

bank.start()                          # background thread; or bank.run() in the foreground
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from participant.core import Event, ParticipantCore, ParticipantSettings
from participant.log import PrepareLog
from participant.operations import (
    BatchHandler,
    BatchHook,
    Handler,
    OperationRegistry,
    OperationSpec,
)
from participant.resources import Resource
from participant.side import OwnEffect, ParticipantObserver, ParticipantSide
from participant.units import UnitOfWork, unit_of_work
from runtime import config, instances, outages, tracing
from runtime.amqp import AmqpChannel
from runtime.auth import Auth
from runtime.driver import BatchDriver, DriverStats, build_or_close
from runtime.heartbeat import HeartbeatSender
from runtime.metrics import MetricsServer, ParticipantMetrics
from runtime.tracing_spans import ParticipantTrace
from schemas import topology
from schemas.permissions import participant
from schemas.records import ParticipantRecord
from schemas.validation import PARTICIPANT_ACCEPTS, Limits

log = logging.getLogger("twophase.participant")


class OperationHandle:
    """What ``@participant.operation(name)`` returns: the handler, plus hook decorators."""

    def __init__(self, registry: OperationRegistry, name: str, handler: Handler) -> None:
        self._registry, self.name, self.handler = registry, name, handler

    def __call__(self, db: Any, args: dict[str, Any]) -> None:
        self.handler(db, args)

    def on_commit(self, hook: Handler) -> Handler:
        self._registry.set_hook(self.name, on_commit=hook)
        return hook

    def on_abort(self, hook: Handler) -> Handler:
        self._registry.set_hook(self.name, on_abort=hook)
        return hook

    def prepare_many(self, handler: BatchHandler) -> BatchHandler:
        """``handler(db, [args, ...]) -> [Refuse or None, ...]``: prepare a batch's branches of
        this operation at once (ReservationResource); the single handler stays the fallback."""
        self._registry.set_hook(self.name, prepare_many=handler)
        return handler

    def on_commit_many(self, hook: BatchHook) -> BatchHook:
        """``hook(db, [args, ...])``: apply many branches at once (say, one executemany)."""
        self._registry.set_hook(self.name, on_commit_many=hook)
        return hook

    def on_abort_many(self, hook: BatchHook) -> BatchHook:
        self._registry.set_hook(self.name, on_abort_many=hook)
        return hook


class Participant:
    def __init__(
        self,
        name: str,
        resource: Resource,
        *,
        amqp_url: str | None = None,
        log_url: str | None = None,
        heartbeat_interval_s: float | None = None,
        prefetch: int = 256,
        orphan_after_s: float = 60.0,
        retention_s: float = 3600.0,
        settings: ParticipantSettings | None = None,
        metrics_port: int | None = None,
        metrics_registry: CollectorRegistry | None = None,
        limits: Limits | None = None,
        auth: Auth | None = None,
    ) -> None:
        """``auth``: the participant's key and keyring; not given, they are read from
        ``TWOPHASE_KEY_FILE`` / ``TWOPHASE_KEYRING`` when the worker starts (or by
        :meth:`configure_auth`)."""
        topology.participant_queue(name)  # validates the name
        self.name = name
        self.resource = resource
        self.amqp_url = config.amqp_url(amqp_url)
        self.log_url = config.log_url(log_url, name)
        self.heartbeat_interval_s = heartbeat_interval_s or config.number(
            None, "TWOPHASE_HEARTBEAT_INTERVAL", 1.0, minimum=0.05, maximum=30.0
        )
        self.orphan_after_s = orphan_after_s
        self.retention_s = retention_s
        self.prefetch = prefetch
        self.settings = settings or ParticipantSettings()
        #: what inbound messages may be (every process of a deployment uses the same)
        self.limits = limits or config.limits()
        #: Prometheus endpoint (TWOPHASE_METRICS_PORT; 0, the default, serves none)
        self.metrics_port = config.metrics_port(metrics_port, 0)
        #: where the metrics are registered (default: the global registry); given one, the
        #: worker counts even without a port
        self.metrics_registry = metrics_registry
        self.auth = auth
        #: run without a key on purpose (``--insecure``): said in the warning that auth is off
        self.insecure = False
        #: whether ``auth`` is settled (given, or read by configure_auth)
        self._auth_configured = auth is not None
        self.registry = OperationRegistry()
        #: builds the channel: AmqpChannel, or twophase.memory's double in tests
        self.channel_factory: Callable[..., Any] | None = None
        self._worker: ParticipantWorker | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def configure_auth(
        self, key_file: str | None = None, keyring: str | None = None, *, insecure: bool = False
    ) -> None:
        """Read the key (flags over ``TWOPHASE_KEY_FILE`` / ``TWOPHASE_KEYRING``); none: off,
        said once at WARNING (runtime.config.auth). ConfigurationError for one that cannot work."""
        # said once the worker is ready: a start that fails says one line, its error
        self.auth = config.auth(
            key_file, keyring, participant(self.name), insecure=insecure, warn=False
        )
        self.insecure, self._auth_configured = config.without_key_allowed(insecure), True

    def operation(self, name: str) -> Callable[[Handler], OperationHandle]:
        def register(handler: Handler) -> OperationHandle:
            self.registry.add(OperationSpec(name, handler))
            return OperationHandle(self.registry, name, handler)

        return register

    def run(self) -> None:
        """Serve in the calling thread until :meth:`stop`: connect and recover (an outage that
        begins meanwhile is waited out, as any later one), then serve. The resource is closed
        when this returns or raises, also when the start failed."""
        try:
            worker: ParticipantWorker | None = None
            for attempt in outages.retrying(what=f"participant {self.name}: starting"):
                with attempt:
                    worker = ParticipantWorker.connect(self)
            assert worker is not None
            self._worker = worker
            self._ready.set()
            worker.serve_forever()
        finally:
            self.resource.close()

    def start(self, *, ready_timeout: float = 30.0) -> threading.Thread:
        """Serve in a background thread; returns once the worker is consuming."""
        failure: list[BaseException] = []

        def target() -> None:
            try:
                self.run()
            except BaseException as exc:
                failure.append(exc)
                self._ready.set()
                raise

        self._thread = threading.Thread(target=target, name=f"twophase-{self.name}", daemon=True)
        self._thread.start()
        self._ready.wait(ready_timeout)
        if failure:
            raise failure[0]
        return self._thread

    def stop(self, timeout: float = 10.0) -> None:
        if self._worker is not None:
            self._worker.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def worker(self) -> ParticipantWorker | None:
        return self._worker


class ParticipantWorker:
    """A participant process's serving part: the driver, given the participant's side and (when
    tracing or metrics are on) its observer. :meth:`connect` builds one (configure, connect,
    recover); :meth:`serve_forever` serves it and closes everything."""

    def __init__(
        self,
        app: Participant,
        driver: BatchDriver[Event, OwnEffect, ParticipantRecord],
        side: ParticipantSide,
        observer: ParticipantObserver | None,
    ) -> None:
        """Only assembles: :meth:`connect` does the I/O."""
        self.app = app
        self.driver = driver
        self.side = side
        self.observer = observer

    @classmethod
    def connect(cls, app: Participant) -> ParticipantWorker:
        """Connect to the log and the broker and rebuild the state from the log and the
        resource; on any failure, close what was opened (the resource is the app's to close).
        Nothing is served until :meth:`serve_forever`."""
        app.resource.bind(app.name)
        if not app._auth_configured:
            app.configure_auth()
        return build_or_close(
            PrepareLog(app.log_url, app.name),
            lambda: _open_channel(app, prefetch=app.prefetch, suffix=""),
            lambda channel, journal: cls._assemble(app, channel, journal),
        )

    @classmethod
    def _assemble(
        cls, app: Participant, channel: AmqpChannel, journal: PrepareLog
    ) -> ParticipantWorker:
        queue = topology.participant_queue(app.name)
        # Only its own queue: binding the coordinator's would need the topic permission to bind
        # that key, with which a participant could bind its own queue to read the coordinator's
        # traffic (docs/architecture.md §11.1). The coordinator binds its queue at start.
        channel.declare_queue(queue)
        # before recovery: a second instance must stop before it reads or changes anything
        instances.serve_alone(channel, queue, journal.log.engine, f"participant {app.name}")
        tracing.setup_from_env(f"twophase-{app.name}")
        trace = ParticipantTrace(app.name) if tracing.ENABLED else None
        side = ParticipantSide(
            app.name,
            app.registry,
            app.settings,
            app.resource,
            journal,
            unit_of_work(app.resource, journal, app.log_url),
            trace,
            orphan_after_s=app.orphan_after_s,
            retention_s=app.retention_s,
        )
        metrics = None
        if app.metrics_port or app.metrics_registry is not None:
            metrics = ParticipantMetrics(app.name, app.metrics_registry)
        observer = None
        if trace is not None or metrics is not None:
            observer = ParticipantObserver(side, trace, metrics)
        name = f"participant {app.name}"
        driver: BatchDriver[Event, OwnEffect, ParticipantRecord] = BatchDriver(
            channel,
            journal,
            side,
            name=name,
            role="participant",
            queue=queue,
            watch=outages.DependencyWatch(
                name, side.dependencies(app.log_url), app.metrics_registry
            ),
            observer=observer,
            max_batch=app.prefetch,
            limits=app.limits,
            accepts=PARTICIPANT_ACCEPTS,
            auth=app.auth,
        )
        driver.every(min(5.0, app.orphan_after_s), side.watch_orphans)
        driver.every(60.0, side.collect_garbage)
        if metrics is not None:
            driver.every(0.5, metrics.refresh)
        driver.recover()
        return cls(app, driver, side, observer)

    # ---- what tests and tools look at ------------------------------------------------------

    @property
    def core(self) -> ParticipantCore:
        return self.side.core

    @property
    def resource(self) -> Resource:
        return self.side.resource

    @property
    def prepare_log(self) -> PrepareLog:
        return self.side.prepare_log

    @property
    def journal(self) -> PrepareLog:
        return self.side.prepare_log

    @property
    def unit(self) -> UnitOfWork:
        return self.side.unit

    @property
    def trace(self) -> ParticipantTrace | None:
        return self.side.trace

    @property
    def metrics(self) -> ParticipantMetrics | None:
        return self.observer.metrics if self.observer is not None else None

    @property
    def observing(self) -> bool:
        return self.driver.observing

    @property
    def channel(self) -> AmqpChannel:
        return self.driver.channel

    @property
    def queue(self) -> str:
        return self.driver.queue

    @property
    def stats(self) -> DriverStats:
        return self.driver.stats

    def turn(self) -> None:
        self.driver.turn()

    def step(self) -> None:
        self.driver.step()

    def stop(self) -> None:
        self.driver.stop()

    def status(self) -> dict[str, Any]:
        return {
            "participant": self.app.name,
            "in_doubt": self.core.in_doubt(),
            "orphans": [tx for tx, _ in self.side.last_orphans],
            "stats": self.stats,
        }

    # ---- serving ---------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Heartbeats (a thread and a connection of their own), the metrics endpoint, then the
        batch loop until stopped; whatever fails, everything started or opened is closed (the
        resource is the app's)."""
        app = self.app
        log.info(
            "participant %s ready: consuming %s, %s",
            app.name,
            self.queue,
            outages.describe(self.driver.watch.dependencies),
        )
        if app.auth is None:
            config.warn_auth_off(app.insecure)
        with contextlib.ExitStack() as opened:
            opened.callback(self.prepare_log.close)
            opened.callback(self.driver.channel.close)
            heartbeats = HeartbeatSender(
                app.name,
                app.heartbeat_interval_s,
                lambda: _open_channel(app, prefetch=1, suffix="-heartbeat"),
                lambda: self.driver.last_progress,
                auth=app.auth,
            )
            if app.metrics_port:
                opened.callback(MetricsServer(app.metrics_port, app.metrics_registry).close)
            heartbeats.start()
            opened.callback(heartbeats.stop)
            self.driver.run()


def _open_channel(app: Participant, *, prefetch: int, suffix: str) -> AmqpChannel:
    channel: AmqpChannel = (app.channel_factory or AmqpChannel)(
        app.amqp_url, prefetch=prefetch, connection_name=f"twophase-{app.name}{suffix}"
    )
    return channel
