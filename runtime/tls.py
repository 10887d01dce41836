"""TLS to RabbitMQ: the one place that turns an AMQP URL into pika's connection parameters.

``amqp://`` is plain TCP. ``amqps://`` verifies the broker's certificate and its host name, against
a CA file if one is given, else the system's trusted CAs; and presents a client certificate when
one is given. Each setting is a query parameter of the URL or, failing that, a variable:

=============  =====================  ==========================================================
``cacertfile`` ``TWOPHASE_AMQP_CA``   PEM file of the CA(s) that signed the broker's certificate
``certfile``   ``TWOPHASE_AMQP_CERT`` PEM file of this process's client certificate (chain)
``keyfile``    ``TWOPHASE_AMQP_KEY``  PEM file of its private key (default: in ``certfile``)
=============  =====================  ==========================================================

pika refuses query parameters it does not know, so ours are taken out before it parses the URL.
PostgreSQL needs nothing here: libpq reads ``sslmode``, ``sslrootcert``, ``sslcert`` and
``sslkey`` from the database URL itself.
"""

from __future__ import annotations

import ssl
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika

from runtime import config
from runtime.errors import ConfigurationError
from runtime.redaction import redact_url

__all__ = [
    "CA_VARIABLE",
    "CERT_VARIABLE",
    "KEY_VARIABLE",
    "amqp_parameters",
    "certificate_refused",
]

CA_VARIABLE = "TWOPHASE_AMQP_CA"
CERT_VARIABLE = "TWOPHASE_AMQP_CERT"
KEY_VARIABLE = "TWOPHASE_AMQP_KEY"
_QUERY_KEYS = {"cacertfile": CA_VARIABLE, "certfile": CERT_VARIABLE, "keyfile": KEY_VARIABLE}


def amqp_parameters(url: str) -> pika.URLParameters:
    """pika's parameters for ``url``; for ``amqps://`` with a verifying TLS context.

    ConfigurationError, one line, for a TLS setting that cannot work (a missing or unreadable
    file, a key that is not the certificate's), TLS settings on an ``amqp://`` URL, which
    would otherwise be ignored without a word, or a URL pika cannot read (its password hidden).
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {key: value for key, value in query if key in _QUERY_KEYS}
    rest = [(key, value) for key, value in query if key not in _QUERY_KEYS]
    try:
        params = pika.URLParameters(urlunsplit(parts._replace(query=urlencode(rest))))
    except ValueError:
        # not pika's words: they quote what it took for the port, a piece of a password with an
        # unencoded "/" in it ("Port could not be cast to integer value as 'ab'")
        raise ConfigurationError(
            f"{redact_url(url)!r} is not an AMQP URL pika can read: in the user and password,"
            " write / ? # @ : as %2F %3F %23 %40 %3A"
        ) from None
    if parts.scheme.lower() != "amqps":
        if ours:
            raise ConfigurationError(
                f"{', '.join(sorted(ours))} given on an amqp:// URL: use amqps:// for TLS"
            )
        return params
    files = {
        key: ours.get(key) or config.setting(None, var, "") for key, var in _QUERY_KEYS.items()
    }
    params.ssl_options = pika.SSLOptions(_context(files), server_hostname=params.host)
    return params


def _context(files: dict[str, str]) -> ssl.SSLContext:
    ca, cert, key = files["cacertfile"], files["certfile"], files["keyfile"]
    try:
        # verification and the host name check on; a CA file given is the only one trusted
        # (create_default_context then skips the system's): trusting both would let any public
        # CA vouch for a host name of ours
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot use AMQP CA file {ca!r} (cacertfile / {CA_VARIABLE}): {_why(exc)}"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if key and not cert:
        raise ConfigurationError(
            f"AMQP client key {key!r} given without a certificate (certfile / {CERT_VARIABLE})"
        )
    if cert:

        def encrypted() -> bytes:
            # without a callback OpenSSL would prompt on the terminal: a service would hang
            raise ConfigurationError(
                f"AMQP client key {key or cert!r} is encrypted: give an unencrypted key "
                "(readable by this user only)"
            )

        try:
            context.load_cert_chain(certfile=cert, keyfile=key or None, password=encrypted)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"cannot use AMQP client certificate {cert!r}"
                f"{f' with key {key!r}' if key else ''}: {_why(exc)}"
            ) from None
    return context


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def certificate_refused(exc: BaseException) -> str | None:
    """Why the broker's certificate was not trusted, when that is what ``exc`` is, else None.

    A connection that fails so fails the same way on every retry until someone changes a
    certificate or a setting: the caller reports it at once instead of retrying as an outage.
    pika wraps the ``ssl`` error it met, so the chain of causes and wrapped errors is searched.
    """
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            return item.verify_message or str(item)
        # pika's connector errors hold theirs in .exceptions (a workflow) and .exception
        todo.extend((item.__cause__, item.__context__, *item.args))
        todo.extend((getattr(item, "exception", None), *getattr(item, "exceptions", ())))
    return None
