"""Mirror intercepts (Telepresence's wiretap, mirrord's default): the app answers every request;
a copy of each matched HTTP/1.x request goes to the client, whose answer is read and discarded.

The app must never wait for the client. The relay records the bytes it sends the app (``Tee``,
up to ``MAX_COPY`` per request) and, once the app's answer has been relayed, offers the copy to
the intercept's :class:`MirrorSink` without blocking: a bounded queue drained by a few workers,
each opening a channel to the client per copy. A full queue, a copy too big to keep, or a
client that cannot be reached drops the copy; every drop is counted (``Intercept.mirror_stats``,
shown by the client's ``status``).

A laptop whose handler has stopped refuses every copy, and each refusal costs an SSH channel
round trip on the loop that relays the app's answers. So a :class:`Breaker` stops copying
after ``TRIP_AFTER`` refusals in a row: for ``COOLDOWN`` seconds copies are dropped (counted)
before any work is done for them, not even kept; then one copy probes the handler, and copying
resumes when it is answered.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from .splice import close_writer

MAX_COPY = 256 * 1024  # bytes of one request kept for its copy; a bigger one is dropped (counted)
QUEUE = 256            # copies waiting for the client; more are dropped
WORKERS = 4            # copies in flight to the client at once
ANSWER_TIMEOUT = 30.0  # seconds a copy waits for the client's answer head before giving up
TRIP_AFTER = 5         # copies refused in a row that stop copying...
COOLDOWN = 3.0         # ...for this many seconds, before one copy probes the handler again


class Tee:
    """A writer that also keeps what it wrote (to ``limit`` bytes): the request as the app got it."""

    def __init__(self, writer: Any, limit: int = MAX_COPY) -> None:
        self.w = writer
        self.kept = bytearray()
        self.limit = limit
        self.overflow = False

    def write(self, data: bytes) -> None:
        self.w.write(data)
        if not self.overflow:
            if len(self.kept) + len(data) > self.limit:
                self.overflow = True
                self.kept.clear()
            else:
                self.kept += data

    async def drain(self) -> None:
        await self.w.drain()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info...: the real writer's
        return getattr(self.w, name)


class Breaker:
    """Closed (copy everything) until ``trip_after`` failures in a row; then open (copy nothing)
    for ``cooldown`` s; then half-open: one probe copy, whose success closes it again and whose
    failure reopens it for another cooldown. Pure logic on an injectable clock."""

    def __init__(self, trip_after: int = TRIP_AFTER, cooldown: float = COOLDOWN,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.trip_after, self.cooldown, self.clock = trip_after, cooldown, clock
        self.failures = 0
        self.open_until: float | None = None
        self.probing = False

    def refusing(self) -> bool:
        """Whether a copy offered now would be dropped before any work (open, no probe due)."""
        return self.open_until is not None and (self.probing or self.clock() < self.open_until)

    def allow(self) -> bool:
        """Whether this copy may go to the client; when a probe is due, this copy is the probe."""
        if self.open_until is None:
            return True
        if self.refusing():
            return False
        self.probing = True
        return True

    def success(self) -> bool:
        """Record an answered copy. Returns whether this closed an open breaker."""
        was_open = self.open_until is not None
        self.failures, self.open_until, self.probing = 0, None, False
        return was_open

    def failure(self) -> bool:
        """Record a refused copy. Returns whether this opened a closed breaker (log it once)."""
        self.failures += 1
        if self.open_until is not None:  # a failed probe, or a copy already in flight when it tripped
            if self.probing:
                self.probing = False
                self.open_until = self.clock() + self.cooldown
            return False
        if self.failures >= self.trip_after:
            self.open_until = self.clock() + self.cooldown
            return True
        return False


class MirrorSink:
    """Copies of one mirror intercept's requests on their way to its client."""

    def __init__(self, icpt: Any, log: Any) -> None:
        self.icpt = icpt
        self.log = log
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE)
        self.breaker = Breaker()
        self.closed = False
        self._workers = [asyncio.ensure_future(self._work()) for _ in range(WORKERS)]

    def refusing(self) -> bool:
        """The copy of a request matched now would be dropped anyway: drop it (counted) before
        the relay keeps its bytes, so a stopped handler costs the app's path nothing but this."""
        if self.closed or self.breaker.refusing():
            self.icpt.mirror_stats["dropped"] += 1
            return True
        return False

    def offer(self, tee: Tee) -> None:
        """Never waits: a copy that cannot be kept or queued is dropped and counted."""
        stats = self.icpt.mirror_stats
        if self.closed or tee.overflow or not tee.kept:
            stats["dropped"] += 1
            return
        try:
            self.queue.put_nowait(bytes(tee.kept))
        except asyncio.QueueFull:
            stats["dropped"] += 1

    async def _work(self) -> None:
        while True:
            copy = await self.queue.get()
            if not self.breaker.allow():  # queued before the breaker opened: dropped unsent
                self.icpt.mirror_stats["dropped"] += 1
                continue
            try:
                await asyncio.wait_for(self._send(copy), ANSWER_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the client is gone, slow or refused: the copy is lost, not the app's answer
                self.icpt.mirror_stats["dropped"] += 1
                self.log.debug("mirror copy for %s dropped: %s", self.icpt.intercept_id, type(e).__name__)
                if self.breaker.failure():
                    self.log.info("mirror %s: the laptop's handler refused %d copies in a row (%s); copies "
                                  "are dropped (counted) and the handler probed every %.0f s",
                                  self.icpt.intercept_id, self.breaker.failures, type(e).__name__,
                                  self.breaker.cooldown)
                continue
            self.icpt.mirror_stats["sent"] += 1
            if self.breaker.success():
                self.log.info("mirror %s: the laptop's handler answers again; copying resumes",
                              self.icpt.intercept_id)

    async def _send(self, copy: bytes) -> None:
        from .http1 import read_head  # http1 imports Tee from here

        assert self.icpt.opener is not None
        reader, writer = await self.icpt.opener()
        try:
            writer.write(copy)
            await writer.drain()
            if await read_head(reader, request=False) is None:  # the answer is discarded; its head ends the copy
                raise ConnectionResetError("the handler closed without an answer")
        finally:
            close_writer(writer)

    def close(self) -> None:
        """Copies still queued are dropped (counted); copies in flight are abandoned."""
        self.closed = True
        self.icpt.mirror_stats["dropped"] += self.queue.qsize()
        for w in self._workers:
            w.cancel()
