"""Heartbeats on a thread and connection of their own.

A participant's batch loop may be busy for seconds (a slow handler, lock waits); heartbeats sent
between batches would then stop, and the coordinator would wrongly call a healthy participant
down (§5: never let a long handler starve heartbeats). So they are published by this thread, on
its own connection (pika is not thread-safe). They stop when the loop they vouch for has made no
progress for ``stall_s``: a wedged worker should be seen as down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from schemas import topology
from schemas.codec import encode
from schemas.messages import Heartbeat
from twophase.amqp import BrokerUnavailable, ConnectionLost

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
    ) -> None:
        self.participant = participant
        self.interval_s = interval_s
        self._open_channel = open_channel
        self._last_progress = last_progress
        self.stall_s = stall_s
        self.sent = 0
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
        channel: Any = None
        interval_ms = int(self.interval_s * 1000)
        while not self._stop.is_set():
            try:
                if channel is None:
                    channel = self._open_channel()
                if time.monotonic() - self._last_progress() <= self.stall_s:
                    now_ms = time.time_ns() // 1_000_000
                    beat = Heartbeat(
                        participant=self.participant, sent_at_ms=now_ms, interval_ms=interval_ms
                    )
                    channel.publish(
                        topology.COORDINATOR_QUEUE, encode(beat), persistent=False, mandatory=False
                    )
                    channel.poll(0)  # lets the connection read confirms and broker heartbeats
                    self.sent += 1
            except (ConnectionLost, BrokerUnavailable) as exc:
                log.debug("heartbeat connection lost: %s", exc)
                if channel is not None:
                    channel.close()
                channel = None
            self._stop.wait(self.interval_s)
        if channel is not None:
            channel.close()
