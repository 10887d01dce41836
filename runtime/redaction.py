"""One way to show a URL or a connection string without its secrets (logs, errors, spans, metrics).

Passwords appear as ``user:PASSWORD@host`` in URLs, and as ``password=...`` in libpq connection
strings and URL query parameters; both are replaced by ``***``. Anything that cannot be parsed
is shown with every ``user:secret@`` pair hidden rather than not at all, and so is every such pair
in the rest of the text (a second URL, a password with an unencoded ``/``, ``?`` or ``#``, which
ends a URL's host part for ``urlsplit`` but not for pika or SQLAlchemy: passwords made with
``base64`` have ``/`` in them). Hiding too much (a host, in a URL whose path holds an ``@``) is
preferred to showing a secret.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_url"]

_KEYWORD_SECRET = re.compile(
    r"((?:password|passwd|sslpassword|sslkey|secret|token)\s*=\s*)('[^']*'|[^\s&;]+)", re.IGNORECASE
)
#: ``//user:secret@``: the secret runs to the next ``@`` and may hold ``/``, ``?``, ``#`` and ``:``
_USERINFO_SECRET = re.compile(r"(//[^/:@\s]*:)[^@\s]*@")


def redact_url(url: str) -> str:
    """``url`` with its password (and ``password=`` parameters) replaced by ``***``."""
    text = _KEYWORD_SECRET.sub(r"\1***", url)
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:  # a malformed port or netloc: the pattern alone
        password = None
    if password is not None:  # the last "@" of the host part ends the password ("p@ss" alike)
        userinfo, _, host = parts.netloc.rpartition("@")
        text = urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}"))
    return _USERINFO_SECRET.sub(r"\1***@", text)
