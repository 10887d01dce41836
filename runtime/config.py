"""Settings from flags and ``TWOPHASE_*`` environment variables (a flag wins over the variable).

=============================  ==========================================================
TWOPHASE_AMQP_URL              RabbitMQ (default amqp://guest:guest@localhost:5672/)
TWOPHASE_DATA_DIR              where default SQLite logs live (default ./.twophase)
TWOPHASE_LOG_URL               this process's log, a path or database URL
                               (default DATA_DIR/coordinator.log.db or DATA_DIR/NAME.log.db)
TWOPHASE_PREFETCH              deliveries per batch (default 512; participants 256)
TWOPHASE_LIVENESS_TIMEOUT      seconds without a heartbeat before a participant is down (3)
TWOPHASE_ONE_PHASE             on (default) or off: single-branch transactions in one phase
TWOPHASE_HEARTBEAT_INTERVAL    participant heartbeat period in seconds (1)
TWOPHASE_CRASHPOINTS           name[:probability],... for fault injection (off)
TWOPHASE_METRICS_PORT          Prometheus endpoint port; 0 disables (coordinator 9464,
                               participants 0)
TWOPHASE_LOG_FORMAT            kv (key=value, default) or json
TWOPHASE_MAX_MESSAGE_BYTES     largest AMQP message body accepted (2097152, 2 MiB)
TWOPHASE_MAX_BRANCHES          branches of one transaction (64)
TWOPHASE_MAX_ARGS_BYTES        one branch's args, encoded as JSON (16384)
TWOPHASE_MAX_REASON_BYTES      reasons longer than this are cut, never refused (1000)
TWOPHASE_MAX_TIMEOUT           a transaction's vote timeout, seconds (600)
TWOPHASE_MAX_TX_ID_LENGTH      characters of a tx_id, 1 to 88 (64)
TWOPHASE_PARTICIPANTS          coordinator: participant names, comma-separated, whose liveness
                               is reported from the start (others once they take part)
TWOPHASE_KEY_FILE              this process's secret key, mode 0600 (runtime.auth.load_auth;
                               made by `twophase keys init`)
TWOPHASE_KEYRING               directory of the public keys of the peers it accepts
TWOPHASE_INSECURE              on: a service starts without a key (as ``--insecure``; off)
TWOPHASE_QUEUE_TYPE            classic (default) or quorum: the type of every durable queue
                               (the clients' reply queues stay classic); one value per vhost
=============================  ==========================================================

The ``TWOPHASE_MAX_*`` limits (:func:`limits`) must be the same in every process of a deployment,
the clients' included (``Client(limits=config.limits())``): what one process sends beyond another's
limits is dead-lettered there. So must ``TWOPHASE_QUEUE_TYPE`` (:func:`queue_type`, read by every
``AmqpChannel``, a ``Client``'s included): every process declares the dead-letter queue, and a
queue declared with another type than it has is refused (ConfigurationError, one line).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from runtime.auth import KEY_FILE_VARIABLE, KEYRING_VARIABLE, Auth, load_auth
from runtime.errors import ConfigurationError
from runtime.redaction import redact_url
from schemas import topology
from schemas.permissions import Identity
from schemas.validation import DEFAULT_LIMITS, TX_ID_HARD_MAX, Limits

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"

log = logging.getLogger("twophase.config")
_warned_auth_off = False


def setting(flag: str | None, variable: str, default: str) -> str:
    """The one resolution of a setting: the flag if given, else the variable, else the default.

    Every process and the ``Client`` read their settings through it (directly, or through the
    typed readers below). Read elsewhere: only the fault-injection and benchmark hooks
    (``TWOPHASE_CRASHPOINTS``, ``TWOPHASE_STATS_FILE``) where they act, and the example bank's
    own variables (``twophase.bank``).
    """
    if flag is not None:
        return flag
    return os.environ.get(variable, default)


def amqp_url(flag: str | None = None) -> str:
    url = setting(flag, "TWOPHASE_AMQP_URL", DEFAULT_AMQP_URL)
    if not url.startswith(("amqp://", "amqps://")):
        raise ConfigurationError(
            f"TWOPHASE_AMQP_URL / --amqp-url {redact_url(url)!r} is not an AMQP URL: "
            "use amqp://USER:PASSWORD@HOST:5672/VHOST"
        )
    return url


def data_dir(flag: str | None = None) -> Path:
    return Path(setting(flag, "TWOPHASE_DATA_DIR", ".twophase"))


def log_url(flag: str | None, default_name: str, data_dir_flag: str | None = None) -> str:
    return setting(
        flag, "TWOPHASE_LOG_URL", str(data_dir(data_dir_flag) / f"{default_name}.log.db")
    )


def number(
    flag: str | None,
    variable: str,
    default: float,
    *,
    minimum: float = 0.0,
    maximum: float = float("inf"),
) -> float:
    text = setting(flag, variable, str(default))
    try:
        value = float(text)
    except ValueError:
        raise ConfigurationError(f"{variable} must be a number, got {text!r}") from None
    if not minimum <= value <= maximum:  # also refuses nan
        bounds = f"at least {minimum}" if maximum == float("inf") else f"{minimum} to {maximum}"
        raise ConfigurationError(f"{variable} must be {bounds}, got {value}")
    return value


def switch(flag: str | None, variable: str, default: bool) -> bool:
    """``on`` or ``off`` (also true/false, yes/no, 1/0)."""
    text = setting(flag, variable, "on" if default else "off").strip().lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ConfigurationError(f"{variable} must be on or off, got {text!r}")


def metrics_port(flag: str | int | None, default: int) -> int:
    """``--metrics-port`` / ``TWOPHASE_METRICS_PORT``: a TCP port, 0 disables."""
    text = str(setting(None if flag is None else str(flag), "TWOPHASE_METRICS_PORT", str(default)))
    try:
        port = int(text)
    except ValueError:
        raise ConfigurationError(
            f"TWOPHASE_METRICS_PORT / --metrics-port must be a port number, got {text!r}"
        ) from None
    if not 0 <= port <= 65535:
        raise ConfigurationError(
            f"TWOPHASE_METRICS_PORT / --metrics-port must be 0 (off) to 65535, got {port}"
        )
    return port


QUEUE_TYPE_VARIABLE = "TWOPHASE_QUEUE_TYPE"


def queue_type(flag: str | None = None) -> str:
    """``TWOPHASE_QUEUE_TYPE``: ``classic`` (default) or ``quorum``, the type every durable queue
    is declared with (schemas.topology.durable_queue_arguments); ConfigurationError otherwise."""
    raw = setting(flag, QUEUE_TYPE_VARIABLE, "")
    text = raw.strip().lower() or "classic"  # unset or empty: the default
    if text not in topology.QUEUE_TYPES:
        raise ConfigurationError(
            f"{QUEUE_TYPE_VARIABLE} must be {' or '.join(topology.QUEUE_TYPES)}, got {raw!r}"
        )
    return text


#: variable -> (Limits field, what a unit of the variable is in the field's unit)
_LIMITS: dict[str, tuple[str, int]] = {
    "TWOPHASE_MAX_MESSAGE_BYTES": ("max_message_bytes", 1),
    "TWOPHASE_MAX_BRANCHES": ("max_branches", 1),
    "TWOPHASE_MAX_ARGS_BYTES": ("max_args_bytes", 1),
    "TWOPHASE_MAX_REASON_BYTES": ("max_reason_bytes", 1),
    "TWOPHASE_MAX_TIMEOUT": ("max_timeout_ms", 1000),  # seconds
    "TWOPHASE_MAX_TX_ID_LENGTH": ("max_tx_id_length", 1),
}


def limits(environ: Mapping[str, str] | None = None) -> Limits:
    """The deployment's :class:`~schemas.validation.Limits` from ``TWOPHASE_MAX_*`` (unset or
    empty: the default); ConfigurationError, one line naming the variable, for a bad value."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    values: dict[str, int] = {}
    for variable, (field, scale) in _LIMITS.items():
        text = env.get(variable, "").strip()
        if not text:
            continue
        default = getattr(DEFAULT_LIMITS, field) // scale
        try:
            value = round(float(text) * scale) if scale != 1 else int(text)
        except (ValueError, OverflowError):  # nan, inf
            kind = "a number of seconds" if scale != 1 else "a whole number"
            raise ConfigurationError(
                f"{variable} must be {kind} (default {default}), got {text!r}"
            ) from None
        low = DEFAULT_LIMITS.min_timeout_ms if field == "max_timeout_ms" else 1
        high = TX_ID_HARD_MAX if field == "max_tx_id_length" else None
        if value < low or (high is not None and value > high):
            shown = f"{low / scale:g}" if scale != 1 else str(low)
            bounds = f"{shown} to {high}" if high is not None else f"at least {shown}"
            raise ConfigurationError(f"{variable} must be {bounds} (default {default}), got {text}")
        values[field] = value
    try:
        return dataclasses.replace(DEFAULT_LIMITS, **values)
    except ValueError as exc:  # Limits checks more than the bounds above; say it in one line
        raise ConfigurationError(f"TWOPHASE_MAX_*: {exc}") from None


def participant_names() -> tuple[str, ...]:
    """``TWOPHASE_PARTICIPANTS``: the deployment's participants, comma-separated (optional:
    the coordinator reports their liveness from the start)."""
    text = os.environ.get("TWOPHASE_PARTICIPANTS", "")
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if not topology.is_valid_participant_name(name):
            raise ConfigurationError(
                f"TWOPHASE_PARTICIPANTS: {name!r} is not a participant name (letters, digits, "
                "'.', '_' or '-', at most 100)"
            )
    return names


INSECURE_VARIABLE = "TWOPHASE_INSECURE"


def without_key_allowed(flag: bool) -> bool:
    """``--insecure`` or ``TWOPHASE_INSECURE=on``: a service may start without a key."""
    return flag or switch(None, INSECURE_VARIABLE, False)


def auth(
    key_file: str | None,
    keyring: str | None,
    identity: Identity | None,
    *,
    insecure: bool = False,
    required: bool = True,
    warn: bool = True,
) -> Auth | None:
    """This process's key and keyring (``--key-file`` / ``TWOPHASE_KEY_FILE``, ``--keyring`` /
    ``TWOPHASE_KEYRING``; runtime.auth.load_auth). ConfigurationError, one line, for a key that
    cannot work (or is not ``identity``'s).

    Neither set: a service (``required``) needs ``insecure`` (``--insecure``) or
    ``TWOPHASE_INSECURE=on``, else ConfigurationError; then None, authentication off, said by
    :func:`warn_auth_off` (here unless ``warn`` is false: a service says it once it is ready, so
    that a start that fails says one line, its error). A ``Client`` is not required to have a
    key: without one it is refused by a coordinator that has keys, which its own log says.
    """
    key_text = setting(key_file, KEY_FILE_VARIABLE, "")
    keyring_text = setting(keyring, KEYRING_VARIABLE, "")
    if key_text or keyring_text:
        return load_auth(key_text, keyring_text, identity=identity, environ={})
    meant = without_key_allowed(insecure)
    if required and not meant:
        raise ConfigurationError(
            f"no key: set {KEY_FILE_VARIABLE} and {KEYRING_VARIABLE} (see `twophase keys init`), "
            f"or start with --insecure ({INSECURE_VARIABLE}=on) to run without authentication"
        )
    if warn:
        warn_auth_off(meant)
    return None


def warn_auth_off(insecure: bool) -> None:
    """Say once per process at WARNING that authentication is off; ``insecure``: because it is
    meant (``--insecure``), which a service must say to start without a key."""
    global _warned_auth_off
    if not _warned_auth_off:
        _warned_auth_off = True  # once: every Client of a process would say it again
        log.warning(
            "authentication off%s: no %s / %s, so any broker account can forge messages",
            " (--insecure)" if insecure else "",
            KEY_FILE_VARIABLE,
            KEYRING_VARIABLE,
        )
    return None
