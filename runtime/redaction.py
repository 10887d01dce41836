"""One way to show a URL or a connection string without its secrets (logs, errors, spans, metrics).

Passwords appear as ``user:PASSWORD@host`` in URLs, and as ``password=...`` in libpq connection
strings and URL query parameters; both are replaced by ``***``. Anything that cannot be parsed
is shown with every ``user:secret@`` pair hidden rather than not at all.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_url"]

_KEYWORD_SECRET = re.compile(
    r"((?:password|passwd|sslpassword|sslkey|secret|token)\s*=\s*)('[^']*'|[^\s&;]+)", re.IGNORECASE
)
_USERINFO_SECRET = re.compile(r"(//[^/:@\s]*:)[^/@\s]*@")


def redact_url(url: str) -> str:
    """``url`` with its password (and ``password=`` parameters) replaced by ``***``."""
    text = _KEYWORD_SECRET.sub(r"\1***", url)
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:  # a malformed port or netloc: fall back to the pattern
        return _USERINFO_SECRET.sub(r"\1***@", text)
    if password is None:
        return _USERINFO_SECRET.sub(r"\1***@", text)
    userinfo, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}"))
