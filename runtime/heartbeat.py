"""Heartbeats on a thread and connection of their own.

A participant's batch loop may be busy for seconds (a slow handler, lock waits); heartbeats sent
between batches would then stop, and the coordinator would wrongly call a healthy participant
down (§5: never let a long handler starve heartbeats). So they are published by this thread, on
its own connection (pika is not thread-safe). They stop when the loop they vouch for has made no
progress for ``stall_s``: a wedged worker should be seen as down. When the broker goes away the
thread reconnects with the shared back-off of :mod:`runtime.outages`, not once a period.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from runtime import outages
from runtime.auth import Auth
from schemas import topology
from schemas.codec import encode
from schemas.messages import Heartbeat

log = logging.getLogger("twophase.heartbeat")


class HeartbeatSender:
    def __init__(
        self,
        participant: str,
        interval_s: float,
        open_channel: Callable[[], Any],
        last_progress: Callable[[], float],
        *,
        stall_s: float = 30.0,
        auth: Auth | None = None,
    ) -> None:
        self.participant = participant
        self.interval_s = interval_s
        self._open_channel = open_channel
        self._last_progress = last_progress
        self.stall_s = stall_s
        #: signs each heartbeat: the coordinator must not take a forged one (§11)
        self.auth = auth
        self.sent = 0
        #: when the connection was lost (None: connected, or not yet)
        self._lost_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"twophase-heartbeat-{participant}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        interval_ms = int(self.interval_s * 1000)
        channel: Any = None
        while not self._stop.is_set():
            if channel is None:
                channel = self._connect()
                if channel is None:  # stopped while waiting for the broker
                    return
            if time.monotonic() - self._last_progress() <= self.stall_s:
                try:
                    self._beat(channel, interval_ms)
                except Exception as exc:
                    _close(channel)
                    channel = None
                    if outages.is_outage(exc):
                        self._lost(exc)
                        continue  # reconnect at once: only failed attempts back off
                    log.error("heartbeats of %s: %s", self.participant, outages.one_line(exc))
            self._stop.wait(self.interval_s)
        _close(channel)

    def _beat(self, channel: Any, interval_ms: int) -> None:
        now_ms = time.time_ns() // 1_000_000
        beat = Heartbeat(participant=self.participant, sent_at_ms=now_ms, interval_ms=interval_ms)
        body, queue = encode(beat), topology.COORDINATOR_QUEUE
        headers = None if self.auth is None else self.auth.sign(body, queue, beat)
        channel.publish(queue, body, headers=headers, persistent=False, mandatory=False)
        channel.poll(0)  # lets the connection read confirms and broker heartbeats
        self.sent += 1

    def _connect(self) -> Any:
        """A channel, once the broker answers: attempts follow the shared back-off (each failure
        logged at DEBUG), not the heartbeat period. None if stopped meanwhile."""
        retrying = outages.retrying(
            until=self._stop,
            what=f"heartbeats of {self.participant}: connecting to RabbitMQ",
            # back within a period of the broker's return: a longer silence reads as "down"
            max_wait=max(0.1, self.interval_s),
        ).copy(sleep=self._stop.wait)  # stop() ends the wait at once
        while not self._stop.is_set():
            try:
                channel = retrying(self._open_channel)
            except Exception as exc:
                if self._stop.is_set():
                    return None
                # not an outage (a bug, a refused login): say so, and try again a period later
                log.error("heartbeats of %s: %s", self.participant, outages.one_line(exc))
                self._stop.wait(self.interval_s)
                continue
            if self._lost_at is not None:
                log.info(
                    "heartbeats of %s: sending again after %.1f s",
                    self.participant,
                    time.monotonic() - self._lost_at,
                )
                self._lost_at = None
            return channel
        return None

    def _lost(self, exc: BaseException) -> None:
        # INFO, not WARNING: the worker's own connection to the same broker reports the outage
        log.info(
            "heartbeats of %s: connection to RabbitMQ lost (%s); reconnecting with back-off",
            self.participant,
            outages.one_line(exc),
        )
        self._lost_at = time.monotonic()


def _close(channel: Any) -> None:
    if channel is not None:
        with contextlib.suppress(Exception):  # it is going away either way
            channel.close()
