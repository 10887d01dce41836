"""Operator tools on a participant: in-doubt branches and heuristic resolution.

A heuristic decision commits or rolls back a prepared branch without the coordinator, for when
the coordinator (or its log) is gone. The worker must be stopped while it is done, the action is
recorded in the prepare log with its reason, and it is checked against the coordinator's decision
when that is known: a contradiction is refused and recorded as a hazard; an unknown decision is
allowed but recorded as a hazard for the operator to reconcile.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import Literal

from participant.log import PrepareLog
from participant.worker import Participant
from runtime.errors import HeuristicHazard
from schemas.records import (
    BranchCompleted,
    BranchPrepared,
    Decision,
    ManualAction,
    ParticipantRecord,
)

#: what the coordinator's log says: a decision, None for "no decision (presumed abort)", or
#: "unknown" when its log could not be read
CoordinatorView = Decision | None | Literal["unknown"]


@dataclass(frozen=True)
class BranchSummary:
    tx_id: str
    state: str
    operation: str = ""
    deadline_ms: int = 0
    manual: bool = False


def summarize(tx_id: str, records: list[ParticipantRecord]) -> BranchSummary:
    prepared = next((r for r in records if isinstance(r, BranchPrepared)), None)
    completed = next((r for r in records if isinstance(r, BranchCompleted)), None)
    manual = any(isinstance(r, ManualAction) for r in records)
    state = "in doubt" if prepared else "unknown"
    if completed is not None:
        state = "committed" if completed.decision is Decision.COMMIT else "aborted"
    return BranchSummary(
        tx_id,
        state,
        prepared.operation if prepared else "",
        prepared.deadline_ms if prepared else 0,
        manual,
    )


def list_branches(
    log: PrepareLog, *, in_doubt: bool = False, limit: int = 100
) -> list[BranchSummary]:
    tx_ids = log.log.tx_ids(limit=limit)
    history = log.history(tx_ids)
    found = [summarize(tx, history.get(tx, [])) for tx in tx_ids]
    return [b for b in found if b.state == "in doubt"] if in_doubt else found


def resolve_branch(
    app: Participant,
    tx_id: str,
    decision: Decision,
    reason: str,
    *,
    coordinator: CoordinatorView,
    operator: str | None = None,
) -> str:
    if not reason.strip():
        raise ValueError("--reason is required: say why, it is recorded in the log")
    who = operator or getpass.getuser()
    # must_exist: opening a mistyped log would create it, and then find nothing in doubt there
    log = PrepareLog(app.log_url, app.name, must_exist=True)
    try:
        return _resolve(app, log, tx_id, decision, reason, coordinator=coordinator, who=who)
    finally:
        log.close()


def _resolve(
    app: Participant,
    log: PrepareLog,
    tx_id: str,
    decision: Decision,
    reason: str,
    *,
    coordinator: CoordinatorView,
    who: str,
) -> str:
    records = log.history([tx_id]).get(tx_id, [])
    summary = summarize(tx_id, records)
    if summary.state != "in doubt":
        raise ValueError(f"{tx_id} is not in doubt at {app.name} (it is {summary.state})")
    expected = Decision.ABORT if coordinator is None else coordinator
    hazard = ""
    if expected == "unknown":
        hazard = "the coordinator's decision could not be checked"
    elif expected is not decision:
        said = "no decision (presumed abort)" if coordinator is None else expected.value.upper()
        log.append(
            [
                ManualAction(
                    tx_id=tx_id,
                    action=f"refused {decision.value}",
                    reason=reason,
                    operator=who,
                    hazard=f"the coordinator's log says {said}",
                )
            ]
        )
        raise HeuristicHazard(
            f"heuristic hazard: the coordinator's log says {said} for {tx_id}; resolving the "
            f"branch at {app.name} as {decision.value.upper()} would break atomicity "
            "(refused, recorded)"
        )
    prepared = next(r for r in records if isinstance(r, BranchPrepared))
    spec = app.registry.get(prepared.operation)
    app.resource.bind(app.name)
    try:
        if decision is Decision.COMMIT:
            if spec is None:
                raise ValueError(f"operation {prepared.operation!r} is not registered in the app")
            app.resource.commit(tx_id, spec, prepared.args)
        else:
            app.resource.abort(tx_id, spec, prepared.args)
    finally:
        app.resource.close()
    log.append(
        [
            ManualAction(
                tx_id=tx_id, action=decision.value, reason=reason, operator=who, hazard=hazard
            ),
            BranchCompleted(
                tx_id=tx_id,
                participant=app.name,
                decision=decision,
                reason=f"resolved by hand: {reason}",
            ),
        ]
    )
    note = f" (hazard recorded: {hazard})" if hazard else ""
    return f"{tx_id} at {app.name} resolved {decision.value.upper()}{note}"
