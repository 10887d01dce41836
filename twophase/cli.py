"""The ``twophase`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twophase import admin_cli, config, logs
from twophase.store import ConfigurationError

Command = Callable[[argparse.Namespace], int]


def _coordinator(args: argparse.Namespace) -> int:
    from coordinator.core import CoordinatorSettings
    from coordinator.service import CoordinatorConfig, run_coordinator

    liveness = config.number(args.liveness_timeout, "TWOPHASE_LIVENESS_TIMEOUT", 3.0, minimum=0.1)
    settings = CoordinatorSettings(
        liveness_timeout_ms=int(liveness * 1000),
        one_phase=config.switch(args.one_phase, "TWOPHASE_ONE_PHASE", True),
    )
    run_coordinator(
        CoordinatorConfig(
            amqp_url=config.amqp_url(args.amqp_url),
            log_url=config.log_url(args.log_url, "coordinator", args.data_dir),
            prefetch=int(config.number(args.prefetch, "TWOPHASE_PREFETCH", 512, minimum=1)),
            settings=settings,
            metrics_port=config.metrics_port(args.metrics_port, 9464),
            metrics_best_effort=args.metrics_port is None
            and "TWOPHASE_METRICS_PORT" not in os.environ,
        )
    )
    return 0


def load_app(spec: str) -> Any:
    """``module:object``; the object is a Participant or a callable that returns one."""
    from participant.worker import Participant

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"--app {spec!r} must look like package.module:object")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"--app {spec!r}: cannot import {module_name!r}: {exc}") from exc
    target = getattr(module, attribute, None)
    if target is None:
        raise ConfigurationError(f"--app {spec!r}: {module_name} has no attribute {attribute!r}")
    app = target if isinstance(target, Participant) else target()
    if not isinstance(app, Participant):
        raise ConfigurationError(f"--app {spec!r} did not give a participant.Participant")
    return app


def _participant(args: argparse.Namespace) -> int:
    if args.data_dir:
        os.environ["TWOPHASE_DATA_DIR"] = args.data_dir
    app = load_app(args.app)
    if args.amqp_url:
        app.amqp_url = config.amqp_url(args.amqp_url)
    if args.log_url:
        app.log_url = args.log_url
    if args.metrics_port is not None:
        app.metrics_port = config.metrics_port(args.metrics_port, 0)
    app.run()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from twophase.demo import run_demo

    return run_demo(args)


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from twophase.bench import add_arguments

    add_arguments(p)


def _bench(args: argparse.Namespace) -> int:
    from twophase.bench import run_bench

    return run_bench(args)


def _chaos(args: argparse.Namespace) -> int:
    from twophase.chaos import run_chaos_command

    return run_chaos_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twophase", description="Two-phase commit (presumed abort) over RabbitMQ."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--amqp-url", help="RabbitMQ URL [TWOPHASE_AMQP_URL]")
        p.add_argument(
            "--data-dir", help="directory of the default SQLite logs [TWOPHASE_DATA_DIR]"
        )

    def log_format(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--log-format",
            choices=logs.FORMATS,
            help="log lines as kv or json [TWOPHASE_LOG_FORMAT]",
        )

    p = sub.add_parser("coordinator", help="run the coordinator service")
    common(p)
    p.add_argument("--log-url", help="decision log: path or database URL [TWOPHASE_LOG_URL]")
    p.add_argument(
        "--metrics-port", help="Prometheus endpoint port, 0 disables [TWOPHASE_METRICS_PORT, 9464]"
    )
    log_format(p)
    p.add_argument("--prefetch", help="deliveries per batch [TWOPHASE_PREFETCH]")
    p.add_argument(
        "--liveness-timeout", help="seconds without heartbeat [TWOPHASE_LIVENESS_TIMEOUT]"
    )
    p.add_argument(
        "--one-phase",
        help="on or off: commit single-branch transactions in one round [TWOPHASE_ONE_PHASE, on]",
    )
    p.set_defaults(run=_coordinator)

    p = sub.add_parser("participant", help="run a participant service")
    common(p)
    p.add_argument("--app", required=True, help="module:object giving a participant.Participant")
    p.add_argument("--log-url", help="prepare log: path or database URL [TWOPHASE_LOG_URL]")
    p.add_argument(
        "--metrics-port", help="Prometheus endpoint port, 0 disables [TWOPHASE_METRICS_PORT, 0]"
    )
    log_format(p)
    p.set_defaults(run=_participant)

    p = sub.add_parser("demo", help="move money between three bank participants")
    common(p)
    p.add_argument("--transfers", type=int, default=200, help="number of transfers (default 200)")
    p.add_argument("--concurrency", type=int, default=32, help="transfers in flight (default 32)")
    p.add_argument("--accounts", type=int, default=10, help="accounts per bank (default 10)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the transfers")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=_demo)

    p = sub.add_parser("chaos", help="the bank under SIGKILLs, crash points and broker restarts")
    common(p)
    p.add_argument("--transfers", type=int, default=300, help="number of transfers (default 300)")
    p.add_argument("--kills", type=int, default=10, help="random SIGKILLs (default 10)")
    p.add_argument("--kicks", type=int, default=None, help="connection kicks (default kills/3)")
    p.add_argument("--concurrency", type=int, default=16, help="transfers in flight (default 16)")
    p.add_argument("--seed", type=int, default=None, help="random seed of load and faults")
    p.add_argument("--pg-url", help="PostgreSQL server; a fresh database is made on it")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-broker-restart", action="store_true", help="skip the full broker restart")
    p.set_defaults(run=_chaos)

    p = sub.add_parser("bench", help="measure throughput and latency, with baselines")
    _bench_arguments(p)
    p.set_defaults(run=_bench)

    admin_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        log_format = logs.log_format(getattr(args, "log_format", None))
    except ConfigurationError as exc:
        print(f"twophase {args.command}: error: {exc}", file=sys.stderr)
        return 2
    # structured lines (key=value or JSON) carrying tx_id and trace_id: see twophase/logs.py
    logs.configure(log_format, logging.DEBUG if args.verbose else logging.INFO, sys.stderr)
    # pika logs every failed connection attempt with a traceback; our drivers turn those into
    # one-line errors or reconnects, so its own log would only repeat them noisily.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if _is_user_error(exc):
            print(f"twophase {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise
    return code


def _is_user_error(exc: BaseException) -> bool:
    from participant.resources import ResourceError
    from twophase.amqp import BrokerUnavailable

    return isinstance(exc, ConfigurationError | BrokerUnavailable | ResourceError)


if __name__ == "__main__":
    sys.exit(main())
