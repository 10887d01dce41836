"""``twophase tx list | show | resolve``: the operator's view of both kinds of log."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas import topology
from schemas.codec import encode, record_kind
from schemas.records import Decision
from twophase import config

if TYPE_CHECKING:
    from participant.admin import CoordinatorView

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
    p.set_defaults(run=_resolve)


def _log_url(args: argparse.Namespace) -> str:
    return config.log_url(args.log_url, args.participant or "coordinator", args.data_dir)


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[
        :-3
    ]


def _list(args: argparse.Namespace) -> int:
    if args.participant:
        from participant.admin import list_branches
        from participant.log import PrepareLog

        for b in list_branches(
            PrepareLog(_log_url(args), args.participant), in_doubt=args.in_doubt, limit=args.limit
        ):
            print(f"{b.tx_id}\t{b.state}\t{b.operation}" + ("\tmanual" if b.manual else ""))
        return 0
    from coordinator.admin import list_transactions
    from coordinator.log import DecisionLog

    for t in list_transactions(
        DecisionLog(_log_url(args)), in_doubt=args.in_doubt, limit=args.limit
    ):
        extra = f"\t{t.reason}" if t.reason else ""
        print(f"{t.tx_id}\t{t.state}\t{','.join(t.participants)}{extra}")
    return 0


def _show(args: argparse.Namespace) -> int:
    if args.participant:
        from participant.log import PrepareLog

        timeline: list[tuple[float, Any]] = list(
            PrepareLog(_log_url(args), args.participant).timeline(args.tx_id)
        )
    else:
        from coordinator.log import DecisionLog

        timeline = list(DecisionLog(_log_url(args)).timeline(args.tx_id))
    if not timeline:
        print(f"{args.tx_id}: no record (presumed abort, or pruned after the retention)")
        return 1
    for written_at, record in timeline:
        print(f"{_when(written_at)}  {record_kind(record):<10} {encode(record).decode()}")
    return 0


def _service_running(args: argparse.Namespace, queue: str) -> bool:
    """Whether a service consumes ``queue``; unknown (broker unreachable) counts as not."""
    from twophase.amqp import AmqpChannel, BrokerUnavailable

    try:
        channel = AmqpChannel(config.amqp_url(args.amqp_url), connection_name="twophase-admin")
    except BrokerUnavailable as exc:
        print(f"warning: cannot check whether the service is running: {exc}", file=sys.stderr)
        return False
    try:
        counts = channel.queue_counts(queue)
    finally:
        channel.close()
    return counts is not None and counts[1] > 0


def _resolve(args: argparse.Namespace) -> int:
    decision = Decision.COMMIT if args.commit else Decision.ABORT
    if args.participant:
        return _resolve_branch(args, decision)
    from coordinator.admin import CoordinatorRunning, HeuristicHazard, resolve
    from coordinator.log import DecisionLog

    running = _service_running(args, topology.COORDINATOR_QUEUE)
    try:
        print(
            resolve(
                DecisionLog(_log_url(args)),
                args.tx_id,
                decision,
                args.reason,
                coordinator_running=running,
            )
        )
    except HeuristicHazard as exc:
        print(str(exc), file=sys.stderr)
        return HAZARD_EXIT
    except (CoordinatorRunning, ValueError) as exc:
        print(f"twophase tx resolve: {exc}", file=sys.stderr)
        return 2
    return 0


def _resolve_branch(args: argparse.Namespace, decision: Decision) -> int:
    from participant.admin import HeuristicHazard, resolve_branch
    from twophase.cli import load_app

    if not args.app:
        print("twophase tx resolve: --participant needs --app module:object", file=sys.stderr)
        return 2
    if _service_running(args, topology.participant_queue(args.participant)):
        print(f"twophase tx resolve: {args.participant} is running; stop it first", file=sys.stderr)
        return 2
    app = load_app(args.app)
    if app.name != args.participant:
        print(
            f"twophase tx resolve: --app gives participant {app.name!r}, not {args.participant!r}",
            file=sys.stderr,
        )
        return 2
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
        print(f"twophase tx resolve: {exc}", file=sys.stderr)
        return 2
    return 0


def _coordinator_view(args: argparse.Namespace) -> CoordinatorView:
    from coordinator.admin import logged_decision
    from coordinator.log import DecisionLog
    from schemas.records import TxCommitting
    from twophase.store import ConfigurationError

    # Not config.log_url: TWOPHASE_LOG_URL names this participant's own log in its environment.
    url = args.coordinator_log or str(config.data_dir(args.data_dir) / "coordinator.log.db")
    try:
        if _missing_sqlite_file(url):
            return "unknown"  # opening it would create an empty log that "says" presumed abort
        records = DecisionLog(url).history([args.tx_id]).get(args.tx_id, [])
    except ConfigurationError:
        return "unknown"
    logged = logged_decision(records)
    if logged is None:
        return None
    return Decision.COMMIT if isinstance(logged, TxCommitting) else Decision.ABORT


def _missing_sqlite_file(url: str) -> bool:
    from sqlalchemy.engine import make_url

    from twophase.store import database_url

    parsed = make_url(database_url(url))
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return False
    return not database.startswith("file:") and not Path(database).exists()
