"""``twophase tx list | show | resolve``: the operator's view of both kinds of log.

Exit status: 0 done, 1 ``show`` found no record, 2 refused (a usage error, a missing log, a
service that is running or whose state the broker cannot tell, an unknown ``tx_id``), 3 refused
as a heuristic hazard. These tools never create a log: a wrong ``--data-dir`` must not look like
an empty, healthy one.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import TYPE_CHECKING, Any

from runtime import config
from runtime.errors import (
    BrokerUnavailable,
    ConfigurationError,
    CoordinatorRunning,
    HeuristicHazard,
    UnknownTransaction,
)
from schemas import topology
from schemas.codec import encode, record_kind
from schemas.records import Decision

if TYPE_CHECKING:
    from participant.admin import CoordinatorView
    from runtime.journal import Journal

REFUSED_EXIT = 2
HAZARD_EXIT = 3


def add_parser(sub: Any) -> None:
    tx = sub.add_parser("tx", help="inspect and resolve transactions from the logs")
    verbs = tx.add_subparsers(dest="verb", required=True)

    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument("--participant", help="read this participant's prepare log instead")
        p.add_argument("--log-url", help="the log to read (default: from TWOPHASE_* settings)")
        p.add_argument("--data-dir", help="directory of the default SQLite logs")

    p = verbs.add_parser("list", help="recent transactions, or only those in doubt")
    where(p)
    p.add_argument("--in-doubt", action="store_true", help="only undecided or unacknowledged")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(run=_list)

    p = verbs.add_parser("show", help="a transaction's timeline from the log")
    where(p)
    p.add_argument("tx_id")
    p.set_defaults(run=_show)

    p = verbs.add_parser("resolve", help="resolve a transaction by hand (recorded, audited)")
    where(p)
    p.add_argument("tx_id")
    choice = p.add_mutually_exclusive_group(required=True)
    choice.add_argument("--commit", action="store_true")
    choice.add_argument("--abort", action="store_true")
    p.add_argument("--reason", required=True, help="why: recorded in the log")
    p.add_argument("--app", help="with --participant: module:object of the participant service")
    p.add_argument("--coordinator-log", help="the coordinator's log, to check a heuristic choice")
    p.add_argument("--amqp-url", help="RabbitMQ, to check that the service is stopped")
    p.add_argument(
        "--force",
        action="store_true",
        help="resolve a tx_id the coordinator's log has no record of (recorded as forced)",
    )
    p.set_defaults(run=_resolve)


def _log_url(args: argparse.Namespace) -> str:
    return config.log_url(args.log_url, args.participant or "coordinator", args.data_dir)


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[
        :-3
    ]


def _open_log(args: argparse.Namespace) -> Journal[Any]:
    """The log to read; a missing one raises ``LogMissing`` (exit status 2), it is not created."""
    if args.participant:
        from participant.log import PrepareLog

        return PrepareLog(_log_url(args), args.participant, must_exist=True)
    from coordinator.log import DecisionLog

    return DecisionLog(_log_url(args), must_exist=True)


def _list(args: argparse.Namespace) -> int:
    log = _open_log(args)
    try:
        if args.participant:
            from participant.admin import list_branches
            from participant.log import PrepareLog

            assert isinstance(log, PrepareLog)
            for b in list_branches(log, in_doubt=args.in_doubt, limit=args.limit):
                print(f"{b.tx_id}\t{b.state}\t{b.operation}" + ("\tmanual" if b.manual else ""))
            return 0
        from coordinator.admin import list_transactions
        from coordinator.log import DecisionLog

        assert isinstance(log, DecisionLog)
        for t in list_transactions(log, in_doubt=args.in_doubt, limit=args.limit):
            extra = f"\t{t.reason}" if t.reason else ""
            print(f"{t.tx_id}\t{t.state}\t{','.join(t.participants)}{extra}")
        return 0
    finally:
        log.close()


def _show(args: argparse.Namespace) -> int:
    log = _open_log(args)
    try:
        timeline = log.timeline(args.tx_id)
    finally:
        log.close()
    if not timeline:
        print(f"{args.tx_id}: no record (presumed abort, or pruned after the retention)")
        return 1
    for written_at, record in timeline:
        print(f"{_when(written_at)}  {record_kind(record):<10} {encode(record).decode()}")
    return 0


def _refuse(message: str) -> int:
    print(f"twophase tx resolve: {message}", file=sys.stderr)
    return REFUSED_EXIT


class _CannotTell(Exception):
    """The broker could not say whether the service is running."""


def _service_running(args: argparse.Namespace, queue: str, service: str) -> bool:
    """Whether a service consumes ``queue``; raises :class:`_CannotTell` when the broker cannot
    be asked. That is a refusal, not a go-ahead: resolving beside a running service that decides
    the same transaction can log both outcomes."""
    from runtime.amqp import AmqpChannel

    url = config.amqp_url(args.amqp_url)
    hint = "; point --amqp-url (or TWOPHASE_AMQP_URL) at the broker the service uses"
    try:
        channel = AmqpChannel(url, connection_name="twophase-admin")
    except BrokerUnavailable as exc:
        raise _CannotTell(f"cannot tell whether {service} is running: {exc}{hint}") from exc
    try:
        counts = channel.queue_counts(queue)
    except Exception as exc:  # whatever stopped the answer, "unknown" refuses: the safe side
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _CannotTell(f"cannot tell whether {service} is running: {reason}{hint}") from exc
    finally:
        channel.close()
    # no such queue: the service has never run against this broker
    return counts is not None and counts[1] > 0


def _resolve(args: argparse.Namespace) -> int:
    decision = Decision.COMMIT if args.commit else Decision.ABORT
    # checked here too so that a usage error needs neither the broker nor the log
    if not args.reason.strip():
        return _refuse("--reason is required: say why, it is recorded in the log")
    if args.participant:
        return _resolve_branch(args, decision)
    from coordinator.admin import resolve
    from coordinator.log import DecisionLog

    try:
        running = _service_running(args, topology.COORDINATOR_QUEUE, "the coordinator")
    except _CannotTell as exc:
        return _refuse(str(exc))
    log = DecisionLog(_log_url(args), must_exist=True)
    try:
        print(
            resolve(
                log,
                args.tx_id,
                decision,
                args.reason,
                coordinator_running=running,
                force=args.force,
            )
        )
    except HeuristicHazard as exc:
        print(str(exc), file=sys.stderr)
        return HAZARD_EXIT
    except (CoordinatorRunning, UnknownTransaction, ValueError) as exc:
        return _refuse(str(exc))
    finally:
        log.close()
    return 0


def _resolve_branch(args: argparse.Namespace, decision: Decision) -> int:
    from participant.admin import resolve_branch
    from twophase.apps import load_app

    if not args.app:
        return _refuse("--participant needs --app module:object")
    if args.force:
        # a branch its log never prepared has nothing to commit or roll back
        return _refuse("--force applies to the coordinator's log only, not with --participant")
    app = load_app(args.app)
    if app.name != args.participant:
        return _refuse(f"--app gives participant {app.name!r}, not {args.participant!r}")
    try:
        if _service_running(args, topology.participant_queue(app.name), app.name):
            return _refuse(f"{app.name} is running; stop it first")
    except _CannotTell as exc:
        return _refuse(str(exc))
    if args.log_url or args.data_dir:
        app.log_url = _log_url(args)
    try:
        print(
            resolve_branch(
                app, args.tx_id, decision, args.reason, coordinator=_coordinator_view(args)
            )
        )
    except HeuristicHazard as exc:
        print(str(exc), file=sys.stderr)
        return HAZARD_EXIT
    except ValueError as exc:
        return _refuse(str(exc))
    return 0


def _coordinator_view(args: argparse.Namespace) -> CoordinatorView:
    from coordinator.admin import logged_decision
    from coordinator.log import DecisionLog
    from schemas.records import TxCommitting

    # Not config.log_url: TWOPHASE_LOG_URL names this participant's own log in its environment.
    url = args.coordinator_log or str(config.data_dir(args.data_dir) / "coordinator.log.db")
    try:
        # must_exist: a log created here would be empty, and an empty log "says" presumed abort
        log = DecisionLog(url, must_exist=True)
    except ConfigurationError:
        return "unknown"
    try:
        records = log.history([args.tx_id]).get(args.tx_id, [])
    finally:
        log.close()
    logged = logged_decision(records)
    if logged is None:
        return None
    return Decision.COMMIT if isinstance(logged, TxCommitting) else Decision.ABORT
