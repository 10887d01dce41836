"""Tracing: one OpenTelemetry trace per transaction, W3C trace context in AMQP headers.

Configured only by the standard ``OTEL_*`` environment variables. Tracing is **on** when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (and
``OTEL_SDK_DISABLED`` is not ``true``, ``OTEL_TRACES_EXPORTER`` is not ``none``); spans then go to
that endpoint by OTLP over HTTP through a ``BatchSpanProcessor`` (``OTEL_BSP_*``), with
``OTEL_SERVICE_NAME`` (or a default per process) as the service name. Otherwise it is **off**, and
off costs nothing: the module-level flag :data:`ENABLED` is checked first and the drivers keep no
trace bookkeeping at all (``driver.trace is None``): no span is created and no trace context is
parsed.

The shape of a transaction's trace::

    submit (client)
    └─ tx (coordinator)                      Begin received .. the coordinator forgets the tx
       ├─ prepare  participant=P             Prepare sent .. P's vote received
       │  ├─ handler <operation> (P)         the operation's handler (resource prepare)
       │  └─ prepare-log write (P)           the group commit that made PREPARED durable
       ├─ decision-log write                 the group commit of the COMMIT / ABORT record
       ├─ commit   participant=P             Commit sent .. P's Ack received
       │  └─ commit (P)                      the resource's commit
       └─ abort    participant=P             Abort sent (no Ack in presumed abort)
          └─ abort (P)                       the resource's rollback

Prepare, Commit and Abort messages carry the context of their per-participant span, so the
participant's spans are its children. Work after a restart (commits re-sent by a recovering
coordinator, inquiries of an in-doubt participant) runs in ``recover`` spans that *link* to the
transaction's original trace (``TxBegun.traceparent`` / ``BranchPrepared.traceparent``).

The bookkeeping lives here and in the drivers' hooks, never in the pure cores.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from schemas.effects import Forget, Incoming, Persist, Send
from schemas.messages import (
    Abort,
    Ack,
    Begin,
    Commit,
    Inquire,
    Outcome,
    OutcomeKind,
    Prepare,
    Vote,
    VoteKind,
)
from schemas.records import BranchCompleted, BranchPrepared, TxAborted, TxBegun, TxCommitting
from schemas.topology import TRACEPARENT_HEADER

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("twophase.tracing")

S = TypeVar("S")

#: True while a tracer provider is installed in this process. Checked before anything else.
ENABLED = False

_provider: TracerProvider | None = None
_tracer: Tracer | None = None
_lock = threading.Lock()
_acquired = 0  # references taken by acquire() on a provider that acquire() installed
_installed_by_acquire = False
_atexit_registered = False

# span attribute names
TX_ID = "tx_id"
PARTICIPANT = "participant"
OPERATION = "operation"
VOTE = "vote"
REASON = "reason"
OUTCOME = "outcome"
AT_FAULT = "at_fault"


# ---- set-up -------------------------------------------------------------------------------------


def endpoint_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The OTLP endpoint the environment asks for, or None when tracing should stay off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return endpoint.strip() if endpoint and endpoint.strip() else None


def setup(
    service_name: str,
    *,
    endpoint: str | None = None,
    exporter: SpanExporter | None = None,
    flush_on_sigterm: bool = True,
) -> bool:
    """Install this process's tracer provider; True if this call installed it.

    ``endpoint`` is an OTLP/HTTP base URL (``/v1/traces`` is appended); without it (and without
    ``exporter``) the ``OTEL_EXPORTER_OTLP_*`` variables are used, and nothing happens when they
    name no endpoint. ``OTEL_SERVICE_NAME`` wins over ``service_name``. Spans are flushed at
    interpreter exit and, for a process that has no SIGTERM handler of its own, on SIGTERM.
    """
    global ENABLED, _provider, _tracer, _atexit_registered
    if exporter is None and endpoint is None and endpoint_from_env() is None:
        return False
    with _lock:
        if _provider is not None:
            return False
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
        provider = TracerProvider(resource=Resource.create(attributes))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = endpoint.rstrip("/") + "/v1/traces" if endpoint is not None else None
            exporter = OTLPSpanExporter(endpoint=url)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        _provider = provider
        _tracer = provider.get_tracer("twophase")
        ENABLED = True
        if not _atexit_registered:
            atexit.register(shutdown)
            _atexit_registered = True
    if flush_on_sigterm:
        _flush_on_sigterm()
    return True


def setup_from_env(service_name: str) -> bool:
    """:func:`setup` from the environment alone; a no-op when tracing is configured or off."""
    if ENABLED or endpoint_from_env() is None:
        return False
    return setup(service_name)


def acquire(service_name: str) -> bool:
    """For libraries (the client): set tracing up from the environment if nobody has.

    True when the caller holds a reference it must give back with :func:`release`; the provider
    is shut down (its spans flushed) when the last reference is released. A provider the
    application installed itself with :func:`setup` is used as is and never counted.
    """
    global _acquired, _installed_by_acquire
    if not ENABLED:
        if not setup(service_name, flush_on_sigterm=False):
            return False
        with _lock:
            _installed_by_acquire = True
    with _lock:
        if not _installed_by_acquire:
            return False
        _acquired += 1
        return True


def release() -> None:
    global _acquired
    with _lock:
        _acquired -= 1
        last = _acquired <= 0 and _installed_by_acquire
    if last:
        shutdown()


def shutdown() -> None:
    """Flush and remove this process's tracer provider; tracing is off afterwards."""
    global ENABLED, _provider, _tracer, _acquired, _installed_by_acquire
    with _lock:
        provider, _provider, _tracer = _provider, None, None
        ENABLED = False
        _acquired, _installed_by_acquire = 0, False
    if provider is not None:
        provider.shutdown()


def force_flush(timeout_ms: int = 5_000) -> None:
    provider = _provider
    if provider is not None:
        provider.force_flush(timeout_ms)


def tracer() -> Tracer:
    found = _tracer
    if found is None:
        raise RuntimeError("tracing is off: check twophase.tracing.ENABLED first")
    return found


def _flush_on_sigterm() -> None:
    """Flush spans on SIGTERM, then die of it as before (only if nobody handles SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with contextlib.suppress(Exception):
            shutdown()
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


# ---- W3C trace context ----------------------------------------------------------------------


def traceparent_of(span: Span) -> str:
    """The W3C ``traceparent`` of ``span`` ("" for an invalid span)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def context_from(traceparent: str) -> Context | None:
    """An OpenTelemetry context whose parent is ``traceparent`` (None: start a new trace)."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = TraceContextTextMapPropagator().extract({TRACEPARENT_HEADER: traceparent})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def link_to(traceparent: str) -> list[Link]:
    """A link to the span ``traceparent`` names (empty when it names none)."""
    ctx = context_from(traceparent)
    if ctx is None:
        return []
    return [Link(trace.get_current_span(ctx).get_span_context())]


def trace_id_of(traceparent: str) -> str:
    """The 32-hex-digit trace id of a ``traceparent`` ("" when malformed)."""
    parts = traceparent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        return parts[1]
    return ""


def current_trace_id() -> str:
    """The trace id of the current span, when tracing is on and a span is current."""
    if not ENABLED:
        return ""
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


def default_headers(send: Send) -> dict[str, str] | None:
    return {TRACEPARENT_HEADER: send.traceparent} if send.traceparent else None


def _headers(span: Span | None, send: Send) -> dict[str, str] | None:
    if span is None:
        return default_headers(send)
    traceparent = traceparent_of(span)
    return {TRACEPARENT_HEADER: traceparent} if traceparent else default_headers(send)


def _set_error(span: Span, description: str) -> None:
    span.set_status(Status(StatusCode.ERROR, description))


# ---- the client -----------------------------------------------------------------------------


def start_submit(tx_id: str, participants: Sequence[str]) -> tuple[Span, str]:
    """The client's ``submit`` span (child of the caller's current span) and its traceparent."""
    span = tracer().start_span(
        "submit",
        kind=SpanKind.CLIENT,
        attributes={TX_ID: tx_id, "participants": list(participants)},
    )
    return span, traceparent_of(span)


def end_submit(span: Span, outcome: Outcome | None, error: BaseException | None = None) -> None:
    if outcome is not None:
        span.set_attribute(OUTCOME, outcome.outcome.value)
        if outcome.outcome is OutcomeKind.ABORTED:
            span.set_attribute(REASON, outcome.reason)
            if outcome.at_fault:
                span.set_attribute(AT_FAULT, outcome.at_fault)
            _set_error(span, outcome.reason or "aborted")
    elif error is not None:
        span.record_exception(error)
        _set_error(span, str(error))
    span.end()


# ---- the coordinator ------------------------------------------------------------------------


@dataclass
class _Tx:
    span: Span
    prepare: dict[str, Span] = field(default_factory=dict)
    commit: dict[str, Span] = field(default_factory=dict)
    abort: dict[str, Span] = field(default_factory=dict)
    aborted: TxAborted | None = None
    forgotten: bool = False


class CoordinatorTrace:
    """The coordinator's spans: ``tx`` per transaction, per-participant ``prepare`` /
    ``commit`` / ``abort``, ``decision-log write``, and ``recover`` after a restart.

    Called by the coordinator service on its driver thread only.
    """

    def __init__(self, tracer_: Tracer | None = None) -> None:
        self._tracer = tracer_ or tracer()
        self._txs: dict[str, _Tx] = {}
        #: Begins of this batch not yet started: tx_id -> (traceparent, received at ns)
        self._begins: dict[str, tuple[str, int]] = {}
        #: inquiries about transactions not in memory (answered by presumed abort), this batch
        self._inquiries: dict[str, Span] = {}
        #: spans to end once the batch's messages have left
        self._ending: list[Span] = []

    @property
    def open_transactions(self) -> int:
        return len(self._txs)

    def on_incoming(self, event: Any) -> None:
        if isinstance(event, Incoming):
            message = event.message
            if isinstance(message, Vote):
                self._voted(message)
            elif isinstance(message, Ack):
                tx = self._txs.get(message.tx_id)
                span = tx.commit.pop(message.participant, None) if tx else None
                if span is not None:
                    span.set_attribute("acked", True)
                    span.end()
            elif isinstance(message, Begin):
                if message.tx_id not in self._txs:
                    self._begins.setdefault(message.tx_id, (event.traceparent, time.time_ns()))
            elif isinstance(message, Inquire):
                self._inquired(message, event.traceparent)

    def on_effect(self, effect: Any) -> None:
        if isinstance(effect, Send):
            message = effect.message
            if isinstance(message, Prepare | Commit | Abort):
                self._sending(message)
        elif isinstance(effect, Persist):
            record = effect.record
            if isinstance(record, TxBegun):
                self._begun(record)
            elif isinstance(record, TxCommitting):
                tx = self._txs.get(record.tx_id)
                if tx is not None:
                    tx.span.set_attribute(OUTCOME, OutcomeKind.COMMITTED.value)
                    self._end_prepares(tx, None)
            elif isinstance(record, TxAborted):
                self._aborted(record)
        elif isinstance(effect, Forget):
            tx = self._txs.get(effect.tx_id)
            if tx is not None:
                tx.forgotten = True

    def headers_for(self, send: Send) -> dict[str, str] | None:
        message = send.message
        tx_id: str = getattr(message, "tx_id", "")
        tx = self._txs.get(tx_id)
        span: Span | None = None
        if tx is not None:
            participant: str = getattr(message, "participant", "")
            if isinstance(message, Prepare):
                span = tx.prepare.get(participant)
            elif isinstance(message, Commit):
                span = tx.commit.get(participant)
            elif isinstance(message, Abort):
                span = tx.abort.get(participant)
            else:
                span = tx.span
        else:
            span = self._inquiries.get(tx_id)
        return _headers(span, send)

    def on_flushed(self, records: Sequence[Any], started_ns: int) -> None:
        for record in records:
            if isinstance(record, TxCommitting | TxAborted):
                tx = self._txs.get(record.tx_id)
                if tx is None:
                    continue
                decision = "commit" if isinstance(record, TxCommitting) else "abort"
                self._tracer.start_span(
                    "decision-log write",
                    context=trace.set_span_in_context(tx.span),
                    attributes={TX_ID: record.tx_id, "decision": decision, "batch": len(records)},
                    start_time=started_ns,
                ).end()

    def on_batch_end(self) -> None:
        """The batch's messages have left: end abort spans, inquiries and forgotten txs."""
        self._begins.clear()
        for span in self._inquiries.values():
            span.end()
        self._inquiries.clear()
        for span in self._ending:
            span.end()
        self._ending.clear()
        done = [tx_id for tx_id, tx in self._txs.items() if tx.forgotten]
        for tx_id in done:
            tx = self._txs.pop(tx_id)
            self._end_prepares(tx, tx.aborted)
            for participant, span in tx.commit.items():  # forgotten without an Ack: not expected
                span.set_attribute(PARTICIPANT, participant)
                span.end()
            tx.span.end()

    # ---- details --------------------------------------------------------------------------------

    def _child(self, tx: _Tx, name: str, tx_id: str, participant: str) -> Span:
        return self._tracer.start_span(
            name,
            context=trace.set_span_in_context(tx.span),
            kind=SpanKind.PRODUCER,
            attributes={TX_ID: tx_id, PARTICIPANT: participant},
        )

    def _begun(self, record: TxBegun) -> None:
        if record.tx_id in self._txs:
            return
        traceparent, received_ns = self._begins.pop(
            record.tx_id, (record.traceparent, time.time_ns())
        )
        self._txs[record.tx_id] = _Tx(self._start_tx(record.tx_id, traceparent, received_ns))
        self._txs[record.tx_id].span.set_attributes(
            {
                "participants": [b.participant for b in record.branches],
                "deadline_ms": record.deadline_ms,
            }
        )

    def _start_tx(self, tx_id: str, traceparent: str, start_ns: int) -> Span:
        return self._tracer.start_span(
            "tx",
            context=context_from(traceparent),
            kind=SpanKind.SERVER,
            attributes={TX_ID: tx_id},
            start_time=start_ns,
        )

    def _sending(self, message: Prepare | Commit | Abort) -> None:
        tx = self._txs.get(message.tx_id)
        if tx is None:
            return
        participant = message.participant
        if isinstance(message, Prepare):
            if participant not in tx.prepare:
                tx.prepare[participant] = self._child(tx, "prepare", message.tx_id, participant)
        elif isinstance(message, Commit):
            span = tx.commit.get(participant)
            if span is None:
                tx.commit[participant] = self._child(tx, "commit", message.tx_id, participant)
            else:
                span.add_event("commit re-sent")
        elif participant not in tx.abort:
            span = self._child(tx, "abort", message.tx_id, participant)
            span.set_attribute(REASON, message.reason)
            tx.abort[participant] = span
            self._ending.append(span)

    def _voted(self, vote: Vote) -> None:
        tx = self._txs.get(vote.tx_id)
        span = tx.prepare.pop(vote.participant, None) if tx else None
        if span is None:
            return
        span.set_attribute(VOTE, vote.vote.value)
        if vote.vote is VoteKind.NO:
            span.set_attribute(REASON, vote.reason)
            _set_error(span, f"{vote.participant} voted NO: {vote.reason}")
        span.end()

    def _aborted(self, record: TxAborted) -> None:
        tx = self._txs.get(record.tx_id)
        if tx is None:
            begin = self._begins.pop(record.tx_id, None)
            if begin is None:
                return
            # refused before it started (a participant down, a bad request): a short tx span
            tx = self._txs[record.tx_id] = _Tx(self._start_tx(record.tx_id, *begin))
            tx.span.set_attribute("refused", True)
        tx.span.set_attribute(OUTCOME, OutcomeKind.ABORTED.value)
        tx.span.set_attribute(REASON, record.reason)
        if record.at_fault:
            tx.span.set_attribute(AT_FAULT, record.at_fault)
        _set_error(tx.span, record.reason)
        # votes that arrive in this same batch still end their prepare span (on_batch_end)
        tx.aborted = record

    def _end_prepares(self, tx: _Tx, aborted: TxAborted | None) -> None:
        """Prepare spans still open at the decision: those participants had not voted."""
        for participant, span in tx.prepare.items():
            span.set_attribute(VOTE, "none")
            if aborted is not None and aborted.at_fault == participant:
                span.set_attribute(REASON, aborted.reason)
                _set_error(span, aborted.reason)
            span.end()
        tx.prepare.clear()

    def _inquired(self, inquire: Inquire, traceparent: str) -> None:
        tx = self._txs.get(inquire.tx_id)
        if tx is not None:
            tx.span.add_event("inquiry", {PARTICIPANT: inquire.participant})
            return
        if inquire.tx_id in self._inquiries:
            return
        self._inquiries[inquire.tx_id] = self._tracer.start_span(
            "inquiry",
            context=context_from(traceparent),
            kind=SpanKind.SERVER,
            attributes={TX_ID: inquire.tx_id, PARTICIPANT: inquire.participant},
        )

    def recovered(self, unfinished: Mapping[str, Iterable[Any]]) -> None:
        """After a restart: a ``recover`` span per unfinished transaction, linked to its trace."""
        for tx_id, records in unfinished.items():
            begun = next((r for r in records if isinstance(r, TxBegun)), None)
            span = self._tracer.start_span(
                "recover",
                kind=SpanKind.INTERNAL,
                attributes={TX_ID: tx_id, "side": "coordinator"},
                links=link_to(begun.traceparent) if begun else [],
            )
            self._txs[tx_id] = _Tx(span)


# ---- a participant --------------------------------------------------------------------------


class ParticipantTrace:
    """A participant's spans: ``handler <operation>``, ``commit``, ``abort`` around the
    resource calls, ``prepare-log write``, and ``recover`` for branches in doubt after a restart.

    The parent of a branch's work is the trace context of the message that asked for it (this
    batch's Commit or Abort, else the branch's Prepare), that is the coordinator's span for this
    participant.
    """

    def __init__(self, participant: str, tracer_: Tracer | None = None) -> None:
        self._tracer = tracer_ or tracer()
        self.participant = participant
        #: tx_id -> traceparent of its Prepare, while the core holds the branch (until Forget)
        self._parents: dict[str, str] = {}
        #: tx_id -> traceparent of the first Commit / Abort of this batch
        self._latest: dict[str, str] = {}
        #: the traceparent of the Commit / Abort being handled ("" for anything else)
        self._current = ""
        #: tx_id -> traceparent of the message whose handling asked to commit / abort it
        self._asked_by: dict[str, str] = {}
        self._recovering: dict[str, Span] = {}
        self._handlers: dict[str, Span] = {}
        #: handler spans of branches prepared or refused, ended when their vote leaves
        self._voting: dict[str, Span] = {}
        self._ending: list[Span] = []

    @property
    def open_spans(self) -> int:
        """Spans begun and not yet ended (handlers of this batch, branches in recovery)."""
        return len(self._handlers) + len(self._voting) + len(self._recovering) + len(self._ending)

    def on_incoming(self, event: Any) -> None:
        if isinstance(event, Incoming):
            message = event.message
            self._current = ""
            if event.traceparent:
                if isinstance(message, Prepare):
                    self._parents[message.tx_id] = event.traceparent
                elif isinstance(message, Commit | Abort):
                    self._latest.setdefault(message.tx_id, event.traceparent)
                    self._current = event.traceparent
        else:
            self._current = ""

    def finish_requested(self, tx_id: str) -> None:
        """The core asked to commit or abort ``tx_id`` while handling the current event: that
        event's message (else this batch's first Commit / Abort, else the Prepare) is the parent
        of the resource's ``commit`` / ``abort`` span."""
        parent = self._current or self._latest.get(tx_id, "")
        if parent:
            self._asked_by[tx_id] = parent

    def on_effect(self, effect: Any) -> None:
        if isinstance(effect, Send):
            if isinstance(effect.message, Vote):
                self._voted(effect.message)
        elif isinstance(effect, Persist) and isinstance(effect.record, BranchCompleted):
            span = self._recovering.pop(effect.record.tx_id, None)
            if span is not None:
                span.set_attribute("decision", effect.record.decision.value)
                self._ending.append(span)
        elif isinstance(effect, Forget):
            self._parents.pop(effect.tx_id, None)

    def headers_for(self, send: Send) -> dict[str, str] | None:
        message = send.message
        if self._recovering and isinstance(message, Inquire):
            return _headers(self._recovering.get(message.tx_id), send)
        return default_headers(send)

    def handler(self, spec: S, tx_id: str) -> S:
        """``spec`` (an ``OperationSpec``) whose handler runs in the ``handler <operation>`` span.

        The span is the current span while the handler runs (the handler's own spans and logs
        nest under it) and ends in :meth:`executed`, once the batch that holds the branch is
        durable in the resource: resources prepare a whole batch in one local transaction.
        """
        handler: Callable[[Any, dict[str, Any]], None] = spec.prepare  # type: ignore[attr-defined]
        name: str = spec.name  # type: ignore[attr-defined]

        def traced(db: Any, args: dict[str, Any]) -> None:
            span = self._handlers.get(tx_id)
            if span is None:
                span = self._handlers[tx_id] = self._start_handler(tx_id, name)
            # a refusal is a NO vote, not an error of the handler: executed() records it
            with trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                handler(db, args)

        return dataclasses.replace(spec, prepare=traced)  # type: ignore[type-var]

    def executed(self, tx_id: str, operation: str, ok: bool, reason: str) -> None:
        """The branch is prepared in the resource (``ok``) or refused; its vote follows."""
        span = self._handlers.pop(tx_id, None) or self._start_handler(tx_id, operation)
        span.set_attribute("prepared", ok)
        if not ok:
            span.set_attribute(REASON, reason)
        self._voting[tx_id] = span

    def _voted(self, vote: Vote) -> None:
        """The vote leaves: it ends the ``handler`` span (an ABORT that overtook the handler
        turns a prepared branch into a NO)."""
        span = self._voting.pop(vote.tx_id, None)
        if span is None:
            return
        span.set_attribute(VOTE, vote.vote.value)
        if vote.vote is VoteKind.NO:
            span.set_attribute(REASON, vote.reason)
            _set_error(span, vote.reason)
        span.end()

    @contextlib.contextmanager
    def finishing(self, branches: Sequence[tuple[str, str, bool]]) -> Iterator[None]:
        """``commit`` / ``abort`` spans around finishing ``(tx_id, operation, commit?)``."""
        spans = [
            self._tracer.start_span(
                "commit" if commit else "abort",
                context=self._parent(tx_id),
                kind=SpanKind.CONSUMER,
                attributes={
                    TX_ID: tx_id,
                    PARTICIPANT: self.participant,
                    OPERATION: operation,
                    "batch": len(branches),
                },
            )
            for tx_id, operation, commit in branches
        ]
        try:
            yield
        except BaseException as exc:
            for span in spans:
                span.record_exception(exc)
                _set_error(span, f"finishing the batch failed: {exc}")
            raise
        finally:
            for span in spans:
                span.end()

    def _start_handler(self, tx_id: str, operation: str) -> Span:
        return self._tracer.start_span(
            f"handler {operation}",
            context=self._parent(tx_id, prepare=True),
            kind=SpanKind.SERVER,
            attributes={TX_ID: tx_id, PARTICIPANT: self.participant, OPERATION: operation},
        )

    def on_flushed(self, records: Sequence[Any], started_ns: int) -> None:
        for record in records:
            if isinstance(record, BranchPrepared):
                self._tracer.start_span(
                    "prepare-log write",
                    context=context_from(self._parents.get(record.tx_id, record.traceparent)),
                    attributes={
                        TX_ID: record.tx_id,
                        PARTICIPANT: self.participant,
                        "batch": len(records),
                    },
                    start_time=started_ns,
                ).end()

    def on_batch_end(self) -> None:
        self._latest.clear()
        self._asked_by.clear()
        for span in [*self._ending, *self._voting.values()]:
            span.end()
        self._ending.clear()
        self._voting.clear()

    def _parent(self, tx_id: str, *, prepare: bool = False) -> Context | None:
        """A handler's parent is the Prepare; a commit's or an abort's, what asked for it."""
        asked_by = "" if prepare else self._asked_by.get(tx_id, "")
        return context_from(asked_by or self._parents.get(tx_id, ""))

    def recovered(self, prepared: Iterable[BranchPrepared]) -> None:
        """After a restart: a ``recover`` span per branch in doubt, linked to its trace."""
        for record in prepared:
            span = self._tracer.start_span(
                "recover",
                attributes={TX_ID: record.tx_id, PARTICIPANT: self.participant, "in_doubt": True},
                links=link_to(record.traceparent),
            )
            self._recovering[record.tx_id] = span
            self._parents[record.tx_id] = traceparent_of(span)


# ---- reading exported traces ----------------------------------------------------------------


@dataclass(frozen=True)
class SpanRecord:
    """An exported span, as far as :func:`format_span_tree` needs it."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    attributes: dict[str, Any]
    error: bool
    start_ns: int
    end_ns: int
    links: tuple[str, ...] = ()


def spans_from_otlp(body: bytes) -> list[SpanRecord]:
    """Decode an OTLP/HTTP protobuf ``ExportTraceServiceRequest`` body."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    found = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _any_value(a.value) for a in resource_spans.resource.attributes}
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                found.append(
                    SpanRecord(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        service=service,
                        attributes={a.key: _any_value(a.value) for a in span.attributes},
                        error=span.status.code == 2,  # STATUS_CODE_ERROR
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        links=tuple(link.trace_id.hex() for link in span.links),
                    )
                )
    return found


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


_SHOWN = (PARTICIPANT, OPERATION, VOTE, OUTCOME, AT_FAULT, REASON, "decision")


def format_span_tree(
    spans: Iterable[SpanRecord], *, shown: Sequence[str] = _SHOWN, label: Callable[..., str] = str
) -> str:
    """The spans as an indented tree (children under their parent, in start order)."""
    spans = sorted(spans, key=lambda s: (s.start_ns, s.end_ns))
    ids = {s.span_id for s in spans}
    children: dict[str, list[SpanRecord]] = {}
    for span in spans:
        parent = span.parent_span_id if span.parent_span_id in ids else ""
        children.setdefault(parent, []).append(span)
    lines: list[str] = []
    origin = spans[0].start_ns if spans else 0

    def walk(span: SpanRecord, depth: int) -> None:
        attributes = " ".join(
            f"{k}={label(span.attributes[k])}" for k in shown if k in span.attributes
        )
        lines.append(
            f"{'    ' * depth}{span.name} [{span.service}] "
            f"+{(span.start_ns - origin) / 1e6:.1f}ms {(span.end_ns - span.start_ns) / 1e6:.1f}ms"
            + (" ERROR" if span.error else "")
            + (f"  {attributes}" if attributes else "")
        )
        for child in children.get(span.span_id, []):
            walk(child, depth + 1)

    for root in children.get("", []):
        walk(root, 0)
    return "\n".join(lines)
