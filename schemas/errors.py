"""The root of every error twophase raises on purpose, and the base of the contract's own errors.

``TwophaseError`` lives here, on the lowest floor, because floors import only downwards: the
contract's errors (:class:`schemas.codec.DecodeError`, :class:`schemas.validation.InvalidMessage`)
need the root above them, and ``schemas`` may import nothing of ``runtime``. Every other error
(configuration, broker, database, resources, the services and the client) is defined in
:mod:`runtime.errors`, which imports the root from here; import errors from there. Both modules
import the standard library only.

``except TwophaseError`` catches what twophase means to raise; a bug (a ``KeyError``, a
``TypeError``) or a library's own error passes through, unless it is chained as the cause.
"""

from __future__ import annotations

__all__ = ["ProtocolError", "TwophaseError"]


class TwophaseError(Exception):
    """Any error twophase raises on purpose; the message is meant for the reader of a log line."""


class ProtocolError(TwophaseError):
    """Bytes or a message outside the contract (``schemas``): not a valid message, or over a
    limit of :class:`schemas.validation.Limits`."""
