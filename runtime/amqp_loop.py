"""One pika ``SelectConnection`` whose I/O loop runs in the calling thread, on demand.

pika's blocking adapter cannot pipeline publisher confirms through its public API (its
``confirm_delivery`` makes every ``basic_publish`` wait for its own confirm), so
:class:`runtime.amqp.AmqpChannel` drives the asynchronous adapter instead: methods are buffered on
pika's ``Channel`` and leave when :meth:`AmqpLink.run` runs the loop, which returns at the time
limit or as soon as a callback calls :meth:`AmqpLink.wake`. Only pika's public API is used:
``SelectConnection``, ``Channel``, the ``IOLoop``'s ``start``/``stop``/``call_later``/
``add_callback_threadsafe``/``close``, and the I/O-services interface a ``SelectConnection``
accepts as ``custom_ioloop`` (``nbio_interface``), through which writes are coalesced.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from pika.adapters.utils import nbio_interface
from pika.adapters.utils.selector_ioloop_adapter import SelectorIOServicesAdapter

log = logging.getLogger("twophase.amqp")

_PLAIN_CAUSES = {
    "Connection refused": "connection refused",
    "ACCESS_REFUSED": "access refused (check the user and password)",
    "Name or service not known": "unknown host",
    "NOT_ALLOWED": "access to the virtual host refused",
    "timed out": "connection timed out",
}

#: an answer the broker owes (connection open, a declare, Confirm.SelectOk) arrives within this;
#: the connection counts as lost otherwise
REPLY_TIMEOUT_SECONDS = 30.0
_CLOSE_TIMEOUT_SECONDS = 5.0


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or repr(exc)
    for marker, plain in _PLAIN_CAUSES.items():
        if marker in text:
            return plain
    return f"{type(exc).__name__}: {text}"


def _innermost(error: BaseException) -> BaseException:
    """The error inside pika's connector errors (``.exceptions[-1]``, then ``.exception``)."""
    while True:
        inner = getattr(error, "exception", None)
        if inner is None:
            inner = (getattr(error, "exceptions", None) or (None,))[-1]
        if not isinstance(inner, BaseException):
            return error
        error = inner


class _ExpectedCloses(logging.Filter):
    """Drops pika's warning about a ``Channel.Close`` from the broker for the channels registered
    here with the reply code that is an answer to them (404 for a passive declare of a missing
    queue), and no other's."""

    def __init__(self) -> None:
        super().__init__()
        self.channels: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def filter(self, record: logging.LogRecord) -> bool:
        # pika.channel logs it as ("Received remote Channel.Close (%s): %r on %s", code, text, ch)
        args = record.args
        if not (isinstance(args, tuple) and len(args) == 3 and hasattr(args[2], "channel_number")):
            return True
        return self.channels.get(args[2]) != args[0]


_expected_closes = _ExpectedCloses()
logging.getLogger("pika.channel").addFilter(_expected_closes)


def expect_close(channel: Any, reply_code: int) -> None:
    """Do not log the broker's closing of ``channel`` with ``reply_code``: the caller takes it as
    an answer."""
    _expected_closes.channels[channel] = reply_code


class _HeldWrites(nbio_interface.AbstractStreamTransport):  # type: ignore[misc]
    """pika's stream transport, except that writes are held until :meth:`flush` and leave
    joined: pika writes a message's method, header and body frames, and each ack, separately,
    and its transport sends each buffer with a ``send`` of its own (60 for 20 publishes), each
    waking the broker's reader."""

    def __init__(self, transport: Any, protocol: Any, ioloop: IOLoop) -> None:
        self._pika_stream, self._protocol, self._ioloop = transport, protocol, ioloop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:  # written inside the loop (a handshake step): leaves this iteration
            self._ioloop.call_later(0, self.flush)
        self._held.append(data)

    def flush(self) -> None:
        if self._held:
            joined = b"".join(self._held)
            self._held.clear()
            self._pika_stream.write(joined)

    def abort(self) -> None:
        self._held.clear()
        self._pika_stream.abort()

    def get_protocol(self) -> Any:
        return self._protocol

    def get_write_buffer_size(self) -> int:
        return int(self._pika_stream.get_write_buffer_size()) + sum(map(len, self._held))


class _Protocol(nbio_interface.AbstractStreamProtocol):  # type: ignore[misc]
    """Stands between pika's transport and its connection, to give the latter a _HeldWrites."""

    def __init__(self, connection: Any, ioloop: IOLoop) -> None:
        self.connection, self._ioloop = connection, ioloop
        self.held: _HeldWrites | None = None

    def connection_made(self, transport: Any) -> None:
        self.held = _HeldWrites(transport, self.connection, self._ioloop)
        self.connection.connection_made(self.held)

    def connection_lost(self, error: BaseException | None) -> None:
        self.connection.connection_lost(error)

    def eof_received(self) -> bool | None:
        return self.connection.eof_received()  # type: ignore[no-any-return]

    def data_received(self, data: bytes) -> None:
        self.connection.data_received(data)


class _IOServices(SelectorIOServicesAdapter):  # type: ignore[misc]
    """pika's own I/O services over an ``IOLoop``, whose streams hold their writes."""

    def __init__(self, ioloop: IOLoop) -> None:
        super().__init__(ioloop)
        self._ioloop = ioloop
        self.streams: list[_Protocol] = []

    def create_streaming_connection(
        self,
        protocol_factory: Callable[[], Any],
        sock: Any,
        on_done: Callable[[Any], None],
        ssl_context: Any = None,
        server_hostname: str | None = None,
    ) -> Any:
        def factory() -> _Protocol:
            stream = _Protocol(protocol_factory(), self._ioloop)
            self.streams.append(stream)
            return stream

        def done(result: Any) -> None:  # the caller expects its own protocol, and our transport
            if isinstance(result, BaseException):
                on_done(result)
            else:
                _pika_stream, stream = result
                on_done((stream.held, stream.connection))

        return super().create_streaming_connection(
            factory, sock, done, ssl_context=ssl_context, server_hostname=server_hostname
        )

    def flush(self) -> None:
        for stream in self.streams:
            if stream.held is not None:
                stream.held.flush()


class AmqpLink:
    """A connected ``SelectConnection`` and its own ``IOLoop``, both used from one thread.

    ``on_lost(reason)`` is called (from within :meth:`run`) when the connection closes.
    """

    def __init__(self, params: pika.URLParameters, on_lost: Callable[[str], None]) -> None:
        self._on_lost = on_lost
        self._running = False
        self._stopping = False
        self._closed_reason: BaseException | None = None
        self._channel_closed: weakref.WeakKeyDictionary[Any, BaseException] = (
            weakref.WeakKeyDictionary()
        )
        self.ioloop = IOLoop()
        self._services = _IOServices(self.ioloop)
        opened: list[Any] = []
        self.connection = pika.SelectConnection(
            params,
            on_open_callback=self._collect(opened),
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self._services,
        )
        try:
            self._run_until(lambda: bool(opened), "connection open")
        except BaseException:
            self.close()
            raise

    @property
    def is_open(self) -> bool:
        return self._closed_reason is None and bool(self.connection.is_open)

    def _on_open_error(self, _connection: Any, error: BaseException | str) -> None:
        if isinstance(error, str):
            self._closed_reason = pika.exceptions.AMQPConnectionError(error)
        elif not isinstance(error, pika.exceptions.AMQPError):
            # a failed TLS handshake comes as pika's connector error, outside AMQPError: made one
            # here, so that it is retried and reported as any other failure to connect is
            wrapped = pika.exceptions.AMQPConnectionError(one_line(_innermost(error)))
            wrapped.__cause__ = error
            self._closed_reason = wrapped
        else:
            self._closed_reason = error
        self.wake()

    def _on_closed(self, _connection: Any, reason: BaseException) -> None:
        self._closed_reason = reason
        self._on_lost(f"connection closed: {one_line(reason)}")
        self.wake()

    def _collect(self, into: list[Any]) -> Callable[[Any], None]:
        """A callback that keeps its argument in ``into`` and wakes the loop."""

        def collect(value: Any) -> None:
            into.append(value)
            self.wake()

        return collect

    def wake(self) -> None:
        """Make the running :meth:`run` return after the events it is dispatching now."""
        if self._running and not self._stopping:
            self._stopping = True
            self.ioloop.stop()

    def run(self, time_limit: float) -> None:
        """Run the I/O loop for up to ``time_limit`` seconds, until :meth:`wake`; with 0, handle
        what is readable and send what is buffered, without waiting."""
        self._services.flush()
        timer = self.ioloop.call_later(max(0.0, time_limit), self.wake)
        self._running, self._stopping = True, False
        try:
            self.ioloop.start()
        finally:
            self._running = False
            self.ioloop.remove_timeout(timer)

    def _run_until(self, done: Callable[[], bool], what: str, channel: Any = None) -> None:
        """Run the loop until ``done()``; raise why the connection or ``channel`` closed, or a
        timeout, instead."""
        deadline = time.monotonic() + REPLY_TIMEOUT_SECONDS
        while not done():
            if channel is not None and channel in self._channel_closed:
                raise self._channel_closed[channel]
            if self._closed_reason is not None:
                raise self._closed_reason
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise pika.exceptions.AMQPConnectionError(
                    f"no {what} within {REPLY_TIMEOUT_SECONDS:.0f} s"
                )
            self.run(remaining)

    def open_channel(self) -> Any:
        """A new open channel; its close by the broker ends every later :meth:`call` on it."""
        opened: list[Any] = []
        self.connection.channel(on_open_callback=self._collect(opened))
        self._run_until(lambda: bool(opened), "Channel.OpenOk")
        channel = opened[0]
        channel.add_on_close_callback(self._on_channel_closed)
        return channel

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        self._channel_closed[channel] = reason
        self.wake()

    def call(self, channel: Any, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``method(*args, callback=..., **kwargs)`` on ``channel``, waited for like a blocking
        call: the reply frame, or the reason the channel or connection closed, raised."""
        replies: list[Any] = []
        method(*args, callback=self._collect(replies), **kwargs)
        self._run_until(lambda: bool(replies), getattr(method, "__name__", "reply"), channel)
        return replies[0]

    def close_channel(self, channel: Any) -> None:
        if channel.is_open:
            channel.close()
            self._run_until(lambda: not channel.is_open, "Channel.CloseOk")

    def add_callback_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in this loop's next :meth:`run` (callable from any thread)."""
        self.ioloop.add_callback_threadsafe(fn)

    def close(self) -> None:
        """Close the connection (briefly waiting for the broker's CloseOk) and the loop."""
        connection = self.connection
        try:
            if not (connection.is_closing or connection.is_closed):
                connection.close()  # also aborts a connection still opening
            deadline = time.monotonic() + _CLOSE_TIMEOUT_SECONDS
            while not connection.is_closed and time.monotonic() < deadline:
                self.run(deadline - time.monotonic())
        except Exception:  # it is going away either way
            log.debug("error while closing the connection", exc_info=True)
        finally:
            self.ioloop.close()
