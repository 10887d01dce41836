"""Structured logs: ``key=value`` lines by default, JSON lines with ``TWOPHASE_LOG_FORMAT=json``.

Every line has ``ts``, ``level``, ``logger`` and ``msg``; a line about a transaction also has
``tx_id``, and ``trace_id`` when tracing is on and a trace is known (the ``traceparent`` given
to :func:`tx`, or the current span). Any other ``extra`` fields follow. Log a transaction with::

    log.warning("branch undecided past its deadline", extra=logs.tx(tx_id, traceparent))

Lines at DEBUG and above with ``twophase -v``, or with ``TWOPHASE_VERBOSE=on`` in the environment,
which the services that ``twophase demo``, ``chaos`` and ``bench`` start inherit; else INFO.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from runtime import config, tracing
from runtime.errors import ConfigurationError

FORMATS = ("kv", "json")
VERBOSE_VARIABLE = "TWOPHASE_VERBOSE"

#: attributes every LogRecord has: anything else on a record came in through ``extra``
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_FIRST = ("tx_id", "trace_id")


def tx(tx_id: str, traceparent: str = "", **fields: Any) -> dict[str, Any]:
    """``extra`` for a log call about transaction ``tx_id``."""
    extra: dict[str, Any] = {"tx_id": tx_id, **fields}
    if traceparent and tracing.ENABLED:
        trace_id = tracing.trace_id_of(traceparent)
        if trace_id:
            extra["trace_id"] = trace_id
    return extra


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record, in output order."""
    fields: dict[str, Any] = {
        "ts": _timestamp(record.created),
        "level": record.levelname,
        "logger": record.name,
        "msg": record.getMessage(),
    }
    extra = record.__dict__
    for key in _FIRST:
        value = extra.get(key)
        if value:
            fields[key] = value
    if "trace_id" not in fields:
        trace_id = tracing.current_trace_id()
        if trace_id:
            fields["trace_id"] = trace_id
    for key, value in extra.items():
        if key not in _STANDARD and key not in fields and not key.startswith("_"):
            fields[key] = value
    return fields


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=INFO logger=twophase.coordinator msg="..." tx_id=... trace_id=...``"""

    def format(self, record: logging.LogRecord) -> str:
        fields = fields_of(record)
        error = _exception(self, record)
        if error:
            fields["exc"] = error
        return " ".join(f"{key}={_kv_value(value)}" for key, value in fields.items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the same fields as :class:`KeyValueFormatter`."""

    def format(self, record: logging.LogRecord) -> str:
        fields = fields_of(record)
        error = _exception(self, record)
        if error:
            fields["exc"] = error
        return json.dumps(fields, default=str, ensure_ascii=False)


def formatter(kind: str) -> logging.Formatter:
    if kind == "json":
        return JsonFormatter()
    if kind == "kv":
        return KeyValueFormatter()
    raise ConfigurationError(
        f"TWOPHASE_LOG_FORMAT / --log-format {kind!r} is not a log format: use kv or json"
    )


def log_format(flag: str | None = None) -> str:
    kind = config.setting(flag, "TWOPHASE_LOG_FORMAT", "kv").strip()
    kind = kind.lower() or "kv"
    formatter(kind)  # validates
    verbose()  # a bad TWOPHASE_VERBOSE, too, ends the command in one line before logging starts
    return kind


def verbose() -> bool:
    """``TWOPHASE_VERBOSE`` (on or off, default off): log at DEBUG, as ``twophase -v`` does."""
    return config.switch(None, VERBOSE_VARIABLE, False)


def configure(kind: str = "kv", level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Route the root logger to ``stream`` (stderr) in the ``kind`` format, at ``level`` or at
    DEBUG when ``TWOPHASE_VERBOSE`` is on."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(kind))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(min(level, logging.DEBUG) if verbose() else level)


def _timestamp(created: float) -> str:
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{whole}.{int(created % 1 * 1000):03d}Z"


def _exception(fmt: logging.Formatter, record: logging.LogRecord) -> str:
    text = ""
    if record.exc_info:
        text = fmt.formatException(record.exc_info)
    if record.stack_info:
        text = (text + "\n" if text else "") + fmt.formatStack(record.stack_info)
    return text


def _kv_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' "=\\\n\r\t') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)
