"""Mirror intercepts (Telepresence's wiretap, mirrord's default): the app answers every request;
a copy of each matched HTTP/1.x request goes to the client, whose answer is read and discarded.

The app must never wait for the client. The relay records the bytes it sends the app (``Tee``,
up to ``MAX_COPY`` per request) and, once the request is fully sent, offers the copy to the
intercept's :class:`MirrorSink` without blocking: a bounded queue drained by a few workers,
each opening a channel to the client per copy. A full queue, a copy too big to keep, or a
client that cannot be reached drops the copy; every drop is counted (``Intercept.mirror_stats``,
shown by the client's ``status``).
"""
from __future__ import annotations

import asyncio
from typing import Any

from .splice import close_writer

MAX_COPY = 256 * 1024  # bytes of one request kept for its copy; a bigger one is dropped (counted)
QUEUE = 256            # copies waiting for the client; more are dropped
WORKERS = 4            # copies in flight to the client at once
ANSWER_TIMEOUT = 30.0  # seconds a copy waits for the client's answer head before giving up


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


class MirrorSink:
    """Copies of one mirror intercept's requests on their way to its client."""

    def __init__(self, icpt: Any, log: Any) -> None:
        self.icpt = icpt
        self.log = log
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE)
        self.closed = False
        self._workers = [asyncio.ensure_future(self._work()) for _ in range(WORKERS)]

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
            try:
                await asyncio.wait_for(self._send(copy), ANSWER_TIMEOUT)
                self.icpt.mirror_stats["sent"] += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the client is gone, slow or refused: the copy is lost, not the app's answer
                self.icpt.mirror_stats["dropped"] += 1
                self.log.debug("mirror copy for %s dropped: %s", self.icpt.intercept_id, type(e).__name__)

    async def _send(self, copy: bytes) -> None:
        from .http1 import read_head  # http1 imports Tee from here

        assert self.icpt.opener is not None
        reader, writer = await self.icpt.opener()
        try:
            writer.write(copy)
            await writer.drain()
            await read_head(reader, request=False)  # the answer is discarded; its head ends the copy
        finally:
            close_writer(writer)

    def close(self) -> None:
        """Copies still queued are dropped (counted); copies in flight are abandoned."""
        self.closed = True
        self.icpt.mirror_stats["dropped"] += self.queue.qsize()
        for w in self._workers:
            w.cancel()
