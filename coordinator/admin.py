"""Operator tools on the coordinator's decision log: listing, timelines, audited resolution.

Manual resolution here is deliberately narrow. A running coordinator decides every transaction by
itself (vote timeout, recovery), so resolution is refused while one consumes the coordinator
queue. With the coordinator stopped, a transaction without a decision can be resolved as ABORT
(that is what presumed abort will make of it anyway, now recorded with a reason); it can never be
resolved as COMMIT, because votes are not logged and rule 3 forbids a COMMIT without every YES.
A one-phase transaction cannot be resolved by hand at all: its branch may have committed unheard,
and only the coordinator's question to the participant (``Abort(one_phase)``) can tell.
Committing a branch by hand is a heuristic decision taken at a participant
(``twophase tx resolve --participant``). Every action is recorded as a ``ManualAction`` with its
reason; one that contradicts the logged decision is refused and recorded as a hazard.
A ``tx_id`` the log has no record of is refused unless forced: it is more likely a typo, or the
wrong log, than a transaction, and resolving it would abort that ``tx_id``'s first real submit.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass

from coordinator.log import DecisionLog
from runtime.errors import CoordinatorRunning, HeuristicHazard, UnknownTransaction
from schemas.records import (
    CoordinatorRecord,
    Decision,
    ManualAction,
    TxAborted,
    TxBegun,
    TxCommitting,
    TxEnded,
)


@dataclass(frozen=True)
class TxSummary:
    tx_id: str
    state: str
    participants: tuple[str, ...]
    reason: str = ""
    at_fault: str | None = None
    manual: bool = False

    @property
    def in_doubt(self) -> bool:
        return self.state in ("undecided", "committing")


def summarize(tx_id: str, records: list[CoordinatorRecord]) -> TxSummary:
    begun = next((r for r in records if isinstance(r, TxBegun)), None)
    participants = tuple(b.participant for b in begun.branches) if begun else ()
    manual = any(isinstance(r, ManualAction) for r in records)
    decision = logged_decision(records)
    if isinstance(decision, TxAborted):
        return TxSummary(
            tx_id,
            "aborted",
            participants or decision.participants,
            decision.reason,
            decision.at_fault,
            manual,
        )
    if isinstance(decision, TxCommitting):
        ended = any(isinstance(r, TxEnded) for r in records)
        state = "committed" if ended else "committing"
        return TxSummary(tx_id, state, participants or decision.participants, manual=manual)
    return TxSummary(tx_id, "undecided", participants, manual=manual)


def logged_decision(records: list[CoordinatorRecord]) -> TxCommitting | TxAborted | None:
    return next((r for r in records if isinstance(r, TxCommitting | TxAborted)), None)


def list_transactions(
    log: DecisionLog, *, in_doubt: bool = False, limit: int = 100
) -> list[TxSummary]:
    if in_doubt:
        found = log.unfinished_transactions()
        summaries = [summarize(tx, records) for tx, records in found.items()]
        return [s for s in summaries if s.in_doubt][:limit]
    tx_ids = log.log.tx_ids(limit=limit)
    history = log.history(tx_ids)
    return [summarize(tx, history.get(tx, [])) for tx in tx_ids]


def resolve(
    log: DecisionLog,
    tx_id: str,
    decision: Decision,
    reason: str,
    *,
    coordinator_running: bool,
    operator: str | None = None,
    force: bool = False,
) -> str:
    """Resolve ``tx_id`` by hand; returns what was done, raises on a hazard or a refusal.

    ``force`` resolves a ``tx_id`` the log has no record of; the ``ManualAction`` says so.
    """
    if not reason.strip():
        raise ValueError("--reason is required: say why, it is recorded in the log")
    if coordinator_running:
        raise CoordinatorRunning(
            "the coordinator is running and decides every transaction itself; stop it first"
        )
    who = operator or getpass.getuser()
    records = log.history([tx_id]).get(tx_id, [])
    if not records and not force:
        raise UnknownTransaction(
            f"{tx_id} is unknown to the coordinator's log at {log.where}: check the tx_id and "
            "--data-dir/--log-url, or add --force to resolve it all the same"
        )
    logged = logged_decision(records)
    wanted = decision.value
    if logged is not None:
        logged_value = "commit" if isinstance(logged, TxCommitting) else "abort"
        if logged_value != wanted:
            hazard = f"the coordinator's log says {logged_value.upper()}"
            log.append(
                [
                    ManualAction(
                        tx_id=tx_id,
                        action=f"refused {wanted}",
                        reason=reason,
                        operator=who,
                        hazard=hazard,
                    )
                ]
            )
            raise HeuristicHazard(
                f"heuristic hazard: {tx_id} was decided {logged_value.upper()}; "
                f"resolving it {wanted.upper()} would break atomicity (refused, recorded)"
            )
        log.append(
            [ManualAction(tx_id=tx_id, action=f"confirmed {wanted}", reason=reason, operator=who)]
        )
        return f"{tx_id} was already decided {wanted.upper()}; confirmation recorded"
    if decision is Decision.COMMIT:
        raise HeuristicHazard(
            f"cannot resolve {tx_id} as COMMIT: no COMMIT decision is logged, votes are not "
            "logged, and presumed abort makes it an ABORT. Resolve it with --abort, or commit a "
            "participant's branch with --participant (a heuristic decision)"
        )
    begun = next((r for r in records if isinstance(r, TxBegun)), None)
    if begun is not None and begun.one_phase:
        raise HeuristicHazard(
            f"cannot resolve {tx_id} as ABORT: it ran in one phase, so its only participant "
            f"({begun.branches[0].participant}) may have committed without the coordinator "
            "hearing it. Start the coordinator: it asks the participant and records its answer"
        )
    participants = tuple(b.participant for b in begun.branches) if begun else ()
    log.append(
        [
            ManualAction(
                tx_id=tx_id,
                action="forced abort" if not records else "abort",
                reason=reason,
                operator=who,
            ),
            TxAborted(
                tx_id=tx_id,
                reason=f"resolved by hand: {reason}",
                participants=participants,
                manual_reason=reason,
            ),
        ]
    )
    return f"{tx_id} resolved ABORT; prepared participants learn it when they inquire"
