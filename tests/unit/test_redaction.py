"""runtime.redaction: a password holding an unencoded ``/``, ``?`` or ``#`` (as ``base64`` makes
them), or in a second URL of one line, is hidden too; an AMQP URL that pika cannot read is refused
in one line that quotes no piece of it (it once printed ``... as 'ab'``, the password's start)."""

from __future__ import annotations

import pytest

from runtime import tls
from runtime.errors import ConfigurationError
from runtime.redaction import redact_url

SECRET = "ab/cd+ef?gh#ij="


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://u:ab/cd@host:5672/v", "amqp://u:***@host:5672/v"),
        ("amqp://u:ab?cd@host/v", "amqp://u:***@host/v"),
        ("amqp://u:ab#cd@host/", "amqp://u:***@host/"),
        (
            f"postgresql://postgres:{SECRET}@127.0.0.1:5432/db",
            "postgresql://postgres:***@127.0.0.1:5432/db",
        ),
        (
            f"postgresql+psycopg://u:{SECRET}@h/db?sslmode=require",
            "postgresql+psycopg://u:***@h/db?sslmode=require",
        ),
        ("amqp://u:p@ss@host/v", "amqp://u:***@host/v"),
        ("amqp://u:ab%2Fcd@host/v", "amqp://u:***@host/v"),
    ],
)
def test_a_password_with_url_delimiters_is_hidden(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_every_url_of_a_line_is_hidden() -> None:
    """A line that starts with a URL urlsplit reads: the URLs after it are hidden as well."""
    line = f"postgresql://u:one@h/db failed, then amqp://v:{SECRET}@h2/ and amqp://w:three@h3/"
    assert redact_url(line) == (
        "postgresql://u:***@h/db failed, then amqp://v:***@h2/ and amqp://w:***@h3/"
    )


def test_what_has_no_password_is_left_alone() -> None:
    for text in (
        "amqp://guest@h/",
        "amqp://h:5672/v",
        "/tmp/bank-a.db",
        "http://127.0.0.1:4318/v1/traces",
    ):
        assert redact_url(text) == text


def test_an_amqp_url_pika_cannot_read_is_one_line_without_the_password() -> None:
    with pytest.raises(ConfigurationError) as refused:
        tls.amqp_parameters(f"amqp://u:{SECRET}@127.0.0.1:5672/v")
    message = str(refused.value)
    assert "amqp://u:***@127.0.0.1:5672/v" in message and "%2F" in message
    assert "\n" not in message
    for piece in SECRET.replace("/", " ").replace("?", " ").replace("#", " ").split():
        assert piece not in message
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
