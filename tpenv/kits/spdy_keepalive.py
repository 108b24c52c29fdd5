"""The SPDY session's keepalive: our pings on a timer, and the verdict when the server goes quiet.

A TCP connection through NATs and proxies can die without a FIN; only traffic tells. The
session (:mod:`tpenv.kits.spdy_session`) pings every ``interval`` and is declared dead when
nothing at all, not even a ping's answer, came for ``timeout``. Any frame counts as life, not
only the answer: spdystream answers pings from a worker that a slow stream can hold up. Kept
apart so the session's module holds the frames' logic and this one the timers'.
"""
from __future__ import annotations

import asyncio
from typing import Callable


class Keepalive:
    """Pings through ``send(ping_id)``; ``dead(quiet_seconds)`` once, when the server stays quiet too long."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Callable[[int], None], dead: Callable[[float], None],
                 *, interval: float, timeout: float) -> None:
        self._loop = loop
        self._send, self._dead = send, dead
        self._interval, self._timeout = interval, timeout
        self._next_id = 1  # client pings are odd
        self._sent: dict[int, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._stopped = False
        self.last_rx = loop.time()
        self.rtt: float | None = None  # of the last answered ping

    def start(self) -> None:
        self._timer = self._loop.call_later(self._interval, self._ping)

    def received(self) -> None:
        """Bytes came from the server: it is alive."""
        self.last_rx = self._loop.time()

    def answered(self, ping_id: int) -> None:
        """The server echoed a PING of ours (ids we did not send are ignored)."""
        if (sent := self._sent.pop(ping_id, None)) is not None:
            self.rtt = self._loop.time() - sent
            if not self._sent and self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

    def stop(self) -> None:
        self._stopped = True
        for t in (self._timer, self._deadline):
            if t is not None:
                t.cancel()

    def _ping(self) -> None:
        if self._stopped:
            return
        pid = self._next_id
        self._next_id += 2
        self._sent[pid] = self._loop.time()
        self._send(pid)
        if self._deadline is None:
            self._deadline = self._loop.call_later(self._timeout, self._overdue)
        self._timer = self._loop.call_later(self._interval, self._ping)

    def _overdue(self) -> None:
        self._deadline = None
        quiet = self._loop.time() - self.last_rx
        if quiet < self._timeout:
            # Frames keep coming, the answer is just queued behind them: still alive.
            self._deadline = self._loop.call_later(self._timeout - quiet, self._overdue)
            return
        self._dead(quiet)
