"""Per-side span bookkeeping: the coordinator's and a participant's spans of a transaction.

:class:`CoordinatorTrace` and :class:`ParticipantTrace` are driven by the services' observation
hooks (on their driver thread) and exist only while tracing is on: the drivers create one only
when ``runtime.tracing.ENABLED`` is set. The trace's shape and the set-up, the W3C trace-context
helpers and the span attribute names live in :mod:`runtime.tracing`, below this module.

The helpers of :mod:`runtime.tracing` are called through the module (``tracing.context_from``),
looked up at each call as before the split, so a patched ``runtime.tracing`` function is the one
used, whenever this module was first imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from runtime import tracing
from runtime.tracing import AT_FAULT, OPERATION, OUTCOME, PARTICIPANT, REASON, TX_ID, VOTE
from schemas.effects import Forget, Incoming, Persist, Send
from schemas.messages import (
    Abort,
    Ack,
    Begin,
    Commit,
    Inquire,
    OutcomeKind,
    Prepare,
    Vote,
    VoteKind,
)
from schemas.records import BranchCompleted, BranchPrepared, TxAborted, TxBegun, TxCommitting

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

S = TypeVar("S")


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
        self._tracer = tracer_ or tracing.tracer()
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
        return tracing._headers(span, send)

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
            context=tracing.context_from(traceparent),
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
                prepare = self._child(tx, "prepare", message.tx_id, participant)
                prepare.set_attribute("one_phase", message.one_phase)
                tx.prepare[participant] = prepare
        elif isinstance(message, Commit):
            span = tx.commit.get(participant)
            if span is None:
                tx.commit[participant] = self._child(tx, "commit", message.tx_id, participant)
            else:
                span.add_event("commit re-sent")
        elif participant not in tx.abort:
            # one phase: a question (did the branch commit?), answered by the vote
            name = "ask" if message.one_phase else "abort"
            span = self._child(tx, name, message.tx_id, participant)
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
            tracing._set_error(span, f"{vote.participant} voted NO: {vote.reason}")
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
        tracing._set_error(tx.span, record.reason)
        # votes that arrive in this same batch still end their prepare span (on_batch_end)
        tx.aborted = record

    def _end_prepares(self, tx: _Tx, aborted: TxAborted | None) -> None:
        """Prepare spans still open at the decision: those participants had not voted."""
        for participant, span in tx.prepare.items():
            span.set_attribute(VOTE, "none")
            if aborted is not None and aborted.at_fault == participant:
                span.set_attribute(REASON, aborted.reason)
                tracing._set_error(span, aborted.reason)
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
            context=tracing.context_from(traceparent),
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
                links=tracing.link_to(begun.traceparent) if begun else [],
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
        self._tracer = tracer_ or tracing.tracer()
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
            return tracing._headers(self._recovering.get(message.tx_id), send)
        return tracing.default_headers(send)

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

        # A batch handler would run outside every branch's span: traced, each branch runs
        # its single handler in its own span.
        return dataclasses.replace(spec, prepare=traced, prepare_many=None)  # type: ignore[type-var]

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
            tracing._set_error(span, vote.reason)
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
                tracing._set_error(span, f"finishing the batch failed: {exc}")
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
                    context=tracing.context_from(
                        self._parents.get(record.tx_id, record.traceparent)
                    ),
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
        return tracing.context_from(asked_by or self._parents.get(tx_id, ""))

    def recovered(self, prepared: Iterable[BranchPrepared]) -> None:
        """After a restart: a ``recover`` span per branch in doubt, linked to its trace."""
        for record in prepared:
            span = self._tracer.start_span(
                "recover",
                attributes={TX_ID: record.tx_id, PARTICIPANT: self.participant, "in_doubt": True},
                links=tracing.link_to(record.traceparent),
            )
            self._recovering[record.tx_id] = span
            self._parents[record.tx_id] = tracing.traceparent_of(span)
