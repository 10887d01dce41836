"""Structured log lines: key=value and JSON, with tx_id and (tracing on) trace_id."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from runtime import logs, tracing
from runtime.errors import ConfigurationError

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def record(message: str = "vote sent", *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("twophase.participant", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def kv_fields(line: str) -> dict[str, str]:
    """Parse a key=value line (values are bare words or JSON strings)."""
    fields: dict[str, str] = {}
    decoder = json.JSONDecoder()
    rest = line
    while rest:
        key, _, rest = rest.partition("=")
        if rest.startswith('"'):
            value, end = decoder.raw_decode(rest)
            rest = rest[end:]
        else:
            value, _, rest = rest.partition(" ")
            rest = " " + rest if rest else ""
        fields[key] = value
        rest = rest.lstrip(" ")
    return fields


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    assert tracing.setup("test-logs", exporter=InMemorySpanExporter(), flush_on_sigterm=False)
    yield
    tracing.shutdown()


def test_key_value_line_has_the_fields_and_quotes_what_needs_it() -> None:
    line = logs.KeyValueFormatter().format(
        record("branch %s voted", "bank-a", **logs.tx("tx-42"), participant="bank-a")
    )
    assert "\n" not in line
    assert line.startswith("ts=")
    fields = kv_fields(line)
    assert fields["level"] == "INFO"
    assert fields["logger"] == "twophase.participant"
    assert fields["msg"] == "branch bank-a voted"
    assert fields["tx_id"] == "tx-42"
    assert fields["participant"] == "bank-a"
    assert "trace_id" not in fields  # tracing is off
    assert fields["ts"].endswith("Z") and "T" in fields["ts"]
    assert list(fields)[:6] == ["ts", "level", "logger", "msg", "tx_id", "participant"]


def test_key_value_quotes_spaces_equals_and_quotes() -> None:
    line = logs.KeyValueFormatter().format(record('say "a=b" now', tx_id="x y"))
    fields = kv_fields(line)
    assert fields["msg"] == 'say "a=b" now' and fields["tx_id"] == "x y"


def test_json_line_has_the_same_fields() -> None:
    line = logs.JsonFormatter().format(record("hello", **logs.tx("tx-1"), attempt=3))
    fields = json.loads(line)
    assert fields["msg"] == "hello" and fields["tx_id"] == "tx-1" and fields["attempt"] == 3
    assert fields["level"] == "INFO" and "trace_id" not in fields


def test_an_exception_stays_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        made = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), None)
        made.exc_info = sys.exc_info()
    line = logs.KeyValueFormatter().format(made)
    assert "\n" not in line
    assert "ValueError: boom" in kv_fields(line)["exc"]
    assert "ValueError: boom" in json.loads(logs.JsonFormatter().format(made))["exc"]


def test_trace_id_only_when_tracing_is_on() -> None:
    assert "trace_id" not in logs.tx("tx-1", TRACEPARENT)


def test_trace_id_from_the_traceparent_when_tracing_is_on(traced: None) -> None:
    extra = logs.tx("tx-1", TRACEPARENT)
    assert extra == {"tx_id": "tx-1", "trace_id": "0af7651916cd43dd8448eb211c80319c"}
    line = logs.KeyValueFormatter().format(record("x", **extra))
    assert kv_fields(line)["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert json.loads(logs.JsonFormatter().format(record("x", **extra)))["trace_id"] == (
        "0af7651916cd43dd8448eb211c80319c"
    )


def test_trace_id_from_the_current_span_when_tracing_is_on(traced: None) -> None:
    from opentelemetry import trace

    span = tracing.tracer().start_span("handler debit")
    with trace.use_span(span, end_on_exit=True):
        fields = json.loads(logs.JsonFormatter().format(record("in handler", tx_id="tx-2")))
    assert fields["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert fields["tx_id"] == "tx-2"
    outside = json.loads(logs.JsonFormatter().format(record("outside", tx_id="tx-2")))
    assert "trace_id" not in outside


def test_configure_routes_the_root_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        logs.configure("json", logging.INFO, stream)
        logging.getLogger("twophase.coordinator").warning("late vote", extra=logs.tx("tx-9"))
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    fields = json.loads(stream.getvalue().strip())
    assert fields["msg"] == "late vote" and fields["tx_id"] == "tx-9"
    assert fields["level"] == "WARNING"


def test_log_format_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWOPHASE_LOG_FORMAT", raising=False)
    assert logs.log_format(None) == "kv"
    monkeypatch.setenv("TWOPHASE_LOG_FORMAT", "JSON")
    assert logs.log_format(None) == "json"
    assert logs.log_format("kv") == "kv"  # the flag wins
    monkeypatch.setenv("TWOPHASE_LOG_FORMAT", "xml")
    with pytest.raises(ConfigurationError, match="kv or json"):
        logs.log_format(None)


def test_the_command_line_rejects_a_bad_log_format(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from twophase.cli import main

    monkeypatch.setenv("TWOPHASE_LOG_FORMAT", "xml")
    assert main(["coordinator"]) == 2
    assert "kv or json" in capsys.readouterr().err


def test_one_phase_is_on_by_default_and_a_bad_value_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from runtime import config
    from twophase.cli import main

    monkeypatch.delenv("TWOPHASE_ONE_PHASE", raising=False)
    assert config.switch(None, "TWOPHASE_ONE_PHASE", True) is True
    monkeypatch.setenv("TWOPHASE_ONE_PHASE", "Off")
    assert config.switch(None, "TWOPHASE_ONE_PHASE", True) is False
    assert config.switch("yes", "TWOPHASE_ONE_PHASE", True) is True  # the flag wins
    monkeypatch.setenv("TWOPHASE_ONE_PHASE", "maybe")
    assert main(["coordinator"]) == 2
    err = capsys.readouterr().err
    assert "TWOPHASE_ONE_PHASE must be on or off, got 'maybe'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("value", "level"), [("on", logging.DEBUG), ("off", logging.INFO)])
def test_verbose_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, level: int
) -> None:
    """TWOPHASE_VERBOSE=on logs at DEBUG as -v does: the services the demo starts inherit it."""
    monkeypatch.setenv(logs.VERBOSE_VARIABLE, value)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure("kv", logging.INFO, io.StringIO())
        assert root.level == level
        logs.configure("kv", logging.DEBUG, io.StringIO())  # -v
        assert root.level == logging.DEBUG
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_a_bad_verbose_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logs.VERBOSE_VARIABLE, "loud")
    with pytest.raises(ConfigurationError, match="TWOPHASE_VERBOSE"):
        logs.log_format(None)
