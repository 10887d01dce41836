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

The bookkeeping lives here, in :mod:`runtime.tracing_spans` and in the drivers' hooks, never in
the pure cores. This module holds the set-up (``OTEL_*``, the tracer provider, :data:`ENABLED`),
the W3C trace-context helpers, the span attribute names, the client's ``submit`` span and the
reading of exported traces (:func:`spans_from_otlp`, :func:`format_span_tree`). The per-side span
bookkeeping, ``CoordinatorTrace`` and ``ParticipantTrace``, lives in
:mod:`runtime.tracing_spans`, which builds on this module.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from schemas.effects import Send
from schemas.messages import Outcome, OutcomeKind
from schemas.topology import TRACEPARENT_HEADER

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("twophase.tracing")

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

        if exporter is None:
            try:  # the OTLP exporter is the optional extra [tracing]
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                from runtime.errors import ConfigurationError

                raise ConfigurationError(
                    "tracing to an OTLP endpoint needs the OTLP exporter:"
                    " pip install 'twophase[tracing]'"
                ) from None

            url = endpoint.rstrip("/") + "/v1/traces" if endpoint is not None else None
            exporter = OTLPSpanExporter(endpoint=url)
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
        provider = TracerProvider(resource=Resource.create(attributes))
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
        raise RuntimeError("tracing is off: check runtime.tracing.ENABLED first")
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
    """Decode an OTLP/HTTP protobuf ``ExportTraceServiceRequest`` body (needs opentelemetry-proto,
    of the extra ``[tracing]``)."""
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
