"""The ``twophase`` command line.

Exit statuses: 0 done; 1 a command's own check failed (``twophase demo``'s balance check, say);
2 a configuration error, said in one line on stderr; 3 a resolution ``twophase tx`` refused
(heuristic hazard); 130 interrupted.

A service starting while PostgreSQL or RabbitMQ is down or refusing connections waits for it with
back-off (logging one line when it finds it down and one when it answers), but ends at once, with
exit status 2, when what it is given cannot work: a database that does not exist, a role or a
password refused, a URL that is not one, an ``--app`` that does not load.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from runtime import config, logs, outages, store
from runtime.errors import BrokerUnavailable, ConfigurationError, ResourceError
from runtime.redaction import redact_url
from schemas.permissions import COORDINATOR
from twophase import admin_cli, keys_cli
from twophase.apps import load_app

Command = Callable[[argparse.Namespace], int]


def _coordinator(args: argparse.Namespace) -> int:
    from coordinator.core import CoordinatorSettings
    from coordinator.service import CoordinatorConfig, run_coordinator

    liveness = config.number(args.liveness_timeout, "TWOPHASE_LIVENESS_TIMEOUT", 3.0, minimum=0.1)
    limits = config.limits()
    settings = CoordinatorSettings(
        liveness_timeout_ms=int(liveness * 1000),
        one_phase=config.switch(args.one_phase, "TWOPHASE_ONE_PHASE", True),
        min_timeout_ms=limits.min_timeout_ms,
        max_timeout_ms=limits.max_timeout_ms,
        max_branches=limits.max_branches,
    )
    coordinator = CoordinatorConfig(
        limits=limits,
        participants=config.participant_names(),
        amqp_url=config.amqp_url(args.amqp_url),
        log_url=config.log_url(args.log_url, "coordinator", args.data_dir),
        prefetch=int(config.number(args.prefetch, "TWOPHASE_PREFETCH", 512, minimum=1)),
        settings=settings,
        metrics_port=config.metrics_port(args.metrics_port, 9464),
        metrics_best_effort=args.metrics_port is None and "TWOPHASE_METRICS_PORT" not in os.environ,
        auth=config.auth(
            args.key_file, args.keyring, COORDINATOR, insecure=args.insecure, warn=False
        ),
        insecure=config.without_key_allowed(args.insecure),
    )
    store.database_url(coordinator.log_url)  # a URL that cannot work ends here, not in the wait
    config.queue_type()  # read by every AmqpChannel; a bad value ends here, not in the wait
    wait_for_dependencies(
        "coordinator",
        [
            database_dependency("log", coordinator.log_url),
            broker_dependency("coordinator", coordinator.amqp_url),
        ],
    )
    run_coordinator(coordinator)
    return 0


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
    if app.auth is None:  # an app that brings its own key keeps it
        app.configure_auth(args.key_file, args.keyring, insecure=args.insecure)
    store.database_url(app.log_url)  # a URL that cannot work ends here, not in the wait
    config.queue_type()  # read by every AmqpChannel; a bad value ends here, not in the wait
    # The databases first: a database that does not exist ends the start before the broker
    # probe's connection (and anything it logs) is made.
    dependencies = [database_dependency("log", app.log_url)]
    probe = getattr(app.resource, "probe", None)
    if probe is not None:
        url = str(getattr(app.resource, "url", type(app.resource).__name__))
        dependencies.append(checked(outages.Dependency("resource", url, probe)))
    dependencies.append(broker_dependency(app.name, app.amqp_url))
    wait_for_dependencies(app.name, dependencies)
    app.run()
    return 0


# ---- start-up: wait for what is down, end at once on what cannot work ------------------------


def wait_for_dependencies(service: str, dependencies: list[outages.Dependency]) -> None:
    """Return once every dependency answers; waits out outages with the shared back-off, logging
    one line per dependency lost and regained. ConfigurationError (exit status 2) for one that
    cannot work, which is no outage and would never end."""
    outages.DependencyWatch(service, dependencies).wait_until_up()


def checked(dependency: outages.Dependency) -> outages.Dependency:
    """``dependency`` whose probe raises ConfigurationError for a setting that cannot work, and
    lets outages through (to be waited for)."""

    def probe() -> None:
        try:
            dependency.probe()
            return
        except ConfigurationError as exc:
            if outages.is_outage(exc) and start_problem(exc) is None:
                raise  # "cannot connect" with a server that is down behind it
            problem = str(exc)
        except Exception as exc:
            found = start_problem(exc)
            if found is None:
                raise
            problem = f"cannot use the {dependency.name} at {redact_url(dependency.url)}: {found}"
        # Raised outside the except clause, so that no outage is its context: it is not waited
        # for (runtime.outages follows an exception's causes and context).
        raise ConfigurationError(problem)

    return outages.Dependency(dependency.name, dependency.url, probe)


def start_problem(exc: BaseException) -> str | None:
    """Why ``exc``, met at start-up, means a setting cannot work; None for an outage."""
    problem = store.configuration_problem(exc) or _broker_problem(exc)
    if problem is not None:
        return problem
    if outages.is_outage(exc):
        return None
    if isinstance(exc, ResourceError):
        return str(exc)
    return outages.one_line(exc)


def _broker_problem(exc: BaseException) -> str | None:
    """A login or virtual host RabbitMQ refused: it will not change by waiting."""
    import pika.exceptions

    refused = (
        pika.exceptions.ProbableAuthenticationError,
        pika.exceptions.ProbableAccessDeniedError,
        pika.exceptions.AuthenticationError,
    )
    link: BaseException | None = exc
    for _ in range(20):  # an exception's chain of causes and contexts is short
        if link is None:
            return None
        if isinstance(link, refused):
            return " ".join(str(link).split()) or type(link).__name__
        link = link.__cause__ or link.__context__
    return None


def database_dependency(name: str, url: str) -> outages.Dependency:
    """A log database: connect once (this creates a SQLite file and its directory)."""

    def probe() -> None:
        import sqlalchemy as sa

        engine = store.make_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()

    return checked(outages.Dependency(name, url, probe))


def broker_dependency(service: str, url: str) -> outages.Dependency:
    """RabbitMQ (named as the drivers name it): open a connection and close it."""

    def probe() -> None:
        from runtime.amqp import AmqpChannel

        AmqpChannel(url, connection_name=f"twophase-{service}-start").close()

    return checked(outages.Dependency("rabbitmq", url, probe))


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

    def keys(p: argparse.ArgumentParser) -> None:
        p.add_argument("--key-file", help="this service's secret key [TWOPHASE_KEY_FILE]")
        p.add_argument("--keyring", help="directory of the peers' public keys [TWOPHASE_KEYRING]")
        p.add_argument(
            "--insecure",
            action="store_true",
            help="run without a key on purpose: any broker account can forge messages",
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
    keys(p)
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
    keys(p)
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

    p = sub.add_parser("fuzz", help="the bank under a flood of hostile messages (issue 12)")
    fuzz = importlib.import_module("twophase.fuzz")
    fuzz.add_arguments(p)
    p.set_defaults(run=fuzz.run_fuzz_command)

    p = sub.add_parser("bench", help="measure throughput and latency, with baselines")
    _bench_arguments(p)
    p.set_defaults(run=_bench)

    admin_cli.add_parser(sub)
    keys_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        log_format = logs.log_format(getattr(args, "log_format", None))
    except ConfigurationError as exc:
        print(f"twophase {args.command}: error: {exc}", file=sys.stderr)
        return 2
    # structured lines (key=value or JSON) carrying tx_id and trace_id: see runtime/logs.py
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
    return isinstance(exc, ConfigurationError | BrokerUnavailable | ResourceError)


if __name__ == "__main__":
    sys.exit(main())
