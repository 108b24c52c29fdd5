"""HTTP/1.x per-request routing on one caller connection (keep-alive aware).

Each request head is parsed (only the head: bodies are streamed through by their framing,
Content-Length or chunked, never buffered whole), routed by the registry at that moment,
and written to a pooled upstream: a connection to the app, or a reused channel to the
client. The response is relayed back the same way. ``Upgrade`` requests (websockets) are
spliced whole to their destination; ``Connection: close`` and HTTP/1.0 end the connection.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .splice import Buffered, close_writer, splice_streams
from .mirror import Tee

HEAD_LIMIT = 64 * 1024
CHUNK = 64 * 1024
# A method token (RFC 9110: GET, PROPFIND, M-SEARCH...) then a space: HTTP/1.x.
_METHOD = re.compile(rb"[A-Z][A-Z0-9_-]{0,19} ")
METHOD_SNIFF = 21


def looks_like_http1(first: bytes) -> bool:
    """The first bytes of a connection start with a method token and a space."""
    return _METHOD.match(first) is not None


class BadMessage(Exception):
    pass


class _Unreachable(Exception):
    """Neither the chosen destination nor its fallback could be connected."""


@dataclass
class Head:
    raw: bytes
    start: list[bytes]                 # request: method, target, version; response: version, status, reason
    headers: dict[bytes, list[bytes]]  # lower-case name -> values

    def values(self, name: bytes) -> list[bytes]:
        return self.headers.get(name, [])

    def tokens(self, name: bytes) -> set[bytes]:
        return {t.strip().lower() for v in self.values(name) for t in v.split(b",") if t.strip()}

    @property
    def chunked(self) -> bool:
        te = self.values(b"transfer-encoding")
        return bool(te) and te[-1].split(b",")[-1].strip().lower() == b"chunked"

    @property
    def content_length(self) -> int | None:
        cl = self.values(b"content-length")
        if not cl:
            return None
        try:
            n = int(cl[0])
        except ValueError:
            raise BadMessage("bad content-length") from None
        if n < 0:
            raise BadMessage("bad content-length")
        return n

    def keep_alive(self, version: bytes) -> bool:
        conn = self.tokens(b"connection")
        if b"close" in conn:
            return False
        return version == b"HTTP/1.1" or b"keep-alive" in conn


def parse_head(raw: bytes, request: bool) -> Head:
    lines = raw[:-4].split(b"\r\n")
    start = lines[0].split(b" ", 2)
    if len(start) < 2 or (request and len(start) != 3):
        raise BadMessage("bad start line")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise BadMessage("bad header line")
        headers.setdefault(name.lower(), []).append(value.strip())
    return Head(raw, start, headers)


async def read_head(reader: Buffered, request: bool) -> Head | None:
    raw = await reader.readuntil(b"\r\n\r\n", HEAD_LIMIT)
    if not raw:
        return None
    return parse_head(raw, request)


class _Out:
    """Coalesces a message's small pieces (head, chunk lines, small bodies) into one write:
    each write is a syscall and a wake-up of the peer, the main cost of relaying small
    requests. Bytes are never held across a read that may wait."""

    def __init__(self, writer: Any, prefix: bytes) -> None:
        self.w = writer
        self.buf = bytearray(prefix)

    async def add(self, data: bytes, src: Buffered) -> None:
        if not self.buf and len(data) >= CHUNK:
            self.w.write(data)
            await self.w.drain()
            return
        self.buf += data
        if len(self.buf) >= CHUNK or src.buffered() == 0:
            await self.flush()

    async def flush(self) -> None:
        if self.buf:
            self.w.write(bytes(self.buf))
            self.buf.clear()
            await self.w.drain()


async def copy_body(src: Buffered, writer: Any, head: Head, *, response_to: bytes | None = None,
                    prefix: bytes = b"") -> bool:
    """Relay one message body as framed by ``head``, after ``prefix`` (the head, written with
    the first piece of body). Returns False when the body ran to EOF (no framing), so the
    connection cannot be reused."""
    out = _Out(writer, prefix)
    if src.buffered() == 0:
        # The body is not here yet (Expect: 100-continue, a slow or streaming sender): the
        # head must not wait for it.
        await out.flush()
    if response_to is not None:
        status = int(head.start[1]) if head.start[1].isdigit() else 0
        if response_to == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            await out.flush()
            return True
    if head.chunked:
        while True:
            line = await src.readuntil(b"\r\n", HEAD_LIMIT)
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadMessage("bad chunk size") from None
            await out.add(line, src)
            if size == 0:
                # Trailers, then the empty line.
                while True:
                    t = await src.readuntil(b"\r\n", HEAD_LIMIT)
                    if not t:
                        raise asyncio.IncompleteReadError(b"", None)
                    out.buf += t
                    if t == b"\r\n":
                        break
                await out.flush()
                return True
            remaining = size + 2
            while remaining:
                data = await src.read_some(min(CHUNK, remaining))
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                remaining -= len(data)
                await out.add(data, src)
    n = head.content_length
    if n is None:
        if response_to is None:
            await out.flush()
            return True  # a request without framing has no body
        await out.flush()
        while True:  # response delimited by close
            data = await src.read_some(CHUNK)
            if not data:
                return False
            writer.write(data)
            await writer.drain()
    remaining = n
    while remaining:
        data = await src.read_some(min(CHUNK, remaining))
        if not data:
            raise asyncio.IncompleteReadError(b"", remaining)
        remaining -= len(data)
        if not remaining:
            out.buf += data
            break
        await out.add(data, src)
    await out.flush()
    return True


Upstream = tuple[Buffered, Any]


class Pool:
    """Idle keep-alive upstreams of one destination (the app port, or one intercept)."""

    def __init__(self, opener: Callable[[], Awaitable[Upstream]], size: int = 32) -> None:
        self._open = opener
        self._idle: list[Upstream] = []
        self._size = size
        self.closed = False

    async def get(self) -> tuple[Upstream, bool]:
        """(upstream, reused)."""
        while self._idle:
            up = self._idle.pop()
            if not up[0].eof and up[0].buffered() == 0 and not up[1].is_closing():
                return up, True
            close_writer(up[1])
        return await self._open(), False

    def put(self, up: Upstream) -> None:
        if self.closed or len(self._idle) >= self._size or up[1].is_closing():
            close_writer(up[1])
        else:
            self._idle.append(up)

    def close(self) -> None:
        self.closed = True
        for _, w in self._idle:
            close_writer(w)
        self._idle.clear()


class Http1Relay:
    """Serves one caller connection. ``route(head)`` -> (Pool, label, fallback Pool|None)."""

    def __init__(self, reader: Buffered, writer: Any, route: Callable[[Head], tuple[Pool, Pool | None]],
                 log: Any, mirror: Callable[[Head], list[Any]] | None = None) -> None:
        self.reader, self.writer, self.route, self.log = reader, writer, route, log
        # The mirror sinks (mirror.MirrorSink) that want a copy of a request, if any.
        self.mirror = mirror

    async def run(self) -> None:
        try:
            while True:
                try:
                    head = await read_head(self.reader, request=True)
                except (BadMessage, ValueError):
                    self.writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    return
                if head is None:
                    return
                if not await self._one(head):
                    return
        except (OSError, ConnectionError, asyncio.IncompleteReadError, BadMessage) as e:
            self.log.debug("caller connection ended: %s", type(e).__name__)
        finally:
            close_writer(self.writer)

    async def _upstream(self, pool: Pool, fallback: Pool | None) -> tuple[Upstream, bool, Pool]:
        try:
            up, reused = await pool.get()
            return up, reused, pool
        except Exception as e:
            if fallback is None:
                self.log.warning("upstream unreachable: %s", type(e).__name__)
                raise _Unreachable() from e
        # The intercept's client is gone; the app is better than an error.
        self.log.info("channel to the client failed; request goes to the app")
        try:
            up, reused = await fallback.get()
        except Exception as e:
            raise _Unreachable() from e
        return up, reused, fallback

    async def _one(self, head: Head) -> bool:
        """One request/response exchange. Returns whether the caller connection lives on."""
        try:
            return await self._exchange(head)
        except _Unreachable:
            self.writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            await self.writer.drain()
            return False

    async def _exchange(self, head: Head) -> bool:
        pool, fallback = self.route(head)
        version = head.start[2]
        if b"upgrade" in head.tokens(b"connection") and head.values(b"upgrade"):
            up, _, _ = await self._upstream(pool, fallback)
            up[1].write(head.raw)
            await splice_streams(self.reader, self.writer, up[0], up[1])
            return False
        has_body = head.chunked or (head.content_length or 0) > 0
        sinks = self.mirror(head) if self.mirror is not None else []
        tee = None
        for attempt in (0, 1):
            (up_r, up_w), reused, used = await self._upstream(pool, fallback)
            # With mirrors, what goes to the destination is also kept, as the copy (mirror.py).
            out_w = tee = Tee(up_w) if sinks else up_w
            if has_body:  # the head goes out with the first piece of body
                body = asyncio.ensure_future(copy_body(self.reader, out_w, head, prefix=head.raw))
            else:
                out_w.write(head.raw)
                body = None
            try:
                resp = await read_head(up_r, request=False)
                while resp is not None and resp.start[1].startswith(b"1") and resp.start[1] != b"101":
                    self.writer.write(resp.raw)  # 100 Continue and friends
                    resp = await read_head(up_r, request=False)
            except (OSError, ConnectionError, asyncio.IncompleteReadError):
                resp = None
            if resp is None:
                close_writer(up_w)
                if body is not None:
                    body.cancel()
                if reused and not has_body and attempt == 0:
                    continue  # a pooled connection closed while idle: retry once, fresh
                self.writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                return False
            break
        if resp.start[1] == b"101":
            self.writer.write(resp.raw)
            if body is not None:
                body.cancel()
            await splice_streams(self.reader, self.writer, up_r, up_w)
            return False
        framed = await copy_body(up_r, self.writer, resp, response_to=head.start[0], prefix=resp.raw)
        if body is not None:
            await body
        for sink in sinks:  # never waits: a copy that cannot be queued is dropped and counted
            sink.offer(tee)
        up_alive = framed and resp.keep_alive(resp.start[0])
        if up_alive:
            used.put((up_r, up_w))
        else:
            close_writer(up_w)
        # A response saying close was relayed with its header: the caller will close too.
        return up_alive and head.keep_alive(version)
