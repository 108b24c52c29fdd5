"""A small asyncio SPDY/3.1 client session: the port-forward fallback when WebSocket is refused.

kubectl speaks SPDY to ``pods/<name>/portforward`` (client-go ``tools/portforward`` over
apimachinery ``httpstream/spdy`` over moby/spdystream); API servers and proxies that refuse
the WebSocket upgrade still accept it. This module is that client, nothing more:

- the upgrade: ``POST .../portforward`` with ``Connection: Upgrade``, ``Upgrade: SPDY/3.1``,
  ``X-Stream-Protocol-Version: portforward.k8s.io`` and the kubeconfig's credentials, over
  TLS; the answer must be ``101`` naming the same protocol. Anything else is mapped like the
  WebSocket path (404 NotFound, 401/403 Forbidden, other TunnelDropped).
- the framing (SPDY draft 3, which 3.1 keeps): control frames SYN_STREAM, SYN_REPLY,
  RST_STREAM, SETTINGS, PING (answered), GOAWAY, HEADERS, WINDOW_UPDATE, and DATA frames.
  Header blocks are zlib streams primed with the SPDY/3 dictionary, one compression context
  per direction for the whole session (a block is flushed with Z_SYNC_FLUSH, never ended).
- port-forward on top (kubelet ``httpstream.go``): each TCP stream is a pair of SPDY streams
  with the headers ``streamtype`` (``error`` / ``data``), ``port`` and ``requestid``. The
  error stream is half-closed at once (we never write to it); text arriving on it is the
  pod side's failure and becomes :class:`~tpenv.errors.TunnelDropped` with that text. A FIN
  on the data stream is the pod side's EOF.
- one session carries many streams, so one TLS connection and one upgrade serve every
  ``open_stream`` of a :class:`~tpenv.kits.portforward.PodTunnel` (WebSocket needs one per
  TCP stream). A session with no streams closes itself after ``idle_timeout``.

Flow control: we keep both SPDY/3.1 windows (per stream and per session, 64 KiB initial
unless the peer's SETTINGS say otherwise) and send WINDOW_UPDATE as the protocol consumes.
The peer's windows are enforced as soon as the peer shows it does flow control (a
WINDOW_UPDATE or an INITIAL_WINDOW_SIZE setting). The kubelet's spdystream does neither
(moby/spdystream#2 "Implement flow control" is open; it ignores WINDOW_UPDATE and never
sends one), and kubectl does not enforce windows against it: enforcing the default 64 KiB
there would stall every stream after 64 KiB. Against such a peer, backpressure is TCP's:
frames go out only while the TLS socket's buffer is below its high-water mark, and a stream
whose reader paused buffers up to ``_STALL_LIMIT`` before the whole socket stops reading
(what spdystream itself does: its frame handler blocks on a slow stream).

Everything runs in callbacks of one asyncio Protocol: no task or thread per stream.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol
from urllib.parse import quote, urlsplit

from tpenv.errors import ClusterUnreachable, Forbidden, NotFound, TunnelDropped

log = logging.getLogger("tpenv.spdy")

VERSION = 3
PORTFORWARD_PROTOCOL = "portforward.k8s.io"

# Frame types (SPDY/3 section 2.6); DATA is not a control type, 0 stands for it here.
DATA, SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 0, 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
# RST_STREAM status codes.
PROTOCOL_ERROR, INVALID_STREAM, REFUSED_STREAM, CANCEL, FLOW_CONTROL_ERROR = 1, 2, 3, 5, 7
SETTINGS_INITIAL_WINDOW_SIZE = 7
DEFAULT_WINDOW = 64 * 1024
MAX_LENGTH = (1 << 24) - 1  # the 24-bit length field

_MAX_DATA_FRAME = 32 * 1024  # small enough that streams interleave fairly on the one socket
_HIGH_WATER = 1024 * 1024  # per stream transport: pause the protocol's writing above this
_LOW_WATER = 256 * 1024
_SOCKET_HIGH_WATER = 256 * 1024  # stop making DATA frames while the TLS socket holds this much
_STALL_LIMIT = 1024 * 1024  # bytes buffered for a paused reader before the whole socket stops reading
_PING_INTERVAL = 15.0
_PING_TIMEOUT = 15.0
_CLOSE_LINGER = 30.0  # after our FIN, how long a stream waits for the peer's before it is reset


def _dictionary() -> bytes:
    """The SPDY/3 header dictionary (draft 3, 2.6.10.1): length-prefixed names and values, then a tail."""
    words = (
        "options head post put delete trace accept accept-charset accept-encoding accept-language accept-ranges "
        "age allow authorization cache-control connection content-base content-encoding content-language "
        "content-length content-location content-md5 content-range content-type date etag expect expires from "
        "host if-match if-modified-since if-none-match if-range if-unmodified-since last-modified location "
        "max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after server te trailer "
        "transfer-encoding upgrade user-agent vary via warning www-authenticate method get status").split()
    words += ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
    tail = ("100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
            "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
            "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
            "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
            "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
            "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.")
    return b"".join(struct.pack(">I", len(w)) + w.encode() for w in words) + tail.encode()


DICTIONARY = _dictionary()


# -- frames ------------------------------------------------------------------------------------

class SpdyProtocolError(Exception):
    """The peer sent bytes that are not SPDY/3 (or a frame we cannot accept)."""


@dataclass
class Frame:
    """One frame, decoded. ``kind`` is DATA or a control type; fields unused by a kind stay default."""

    kind: int
    stream_id: int = 0
    flags: int = 0
    data: bytes = b""  # DATA payload
    headers: dict[str, str] | None = None  # SYN_STREAM, SYN_REPLY, HEADERS
    status: int = 0  # RST_STREAM, GOAWAY
    value: int = 0  # PING id, WINDOW_UPDATE delta, GOAWAY last-good stream id, SYN_STREAM associated id
    priority: int = 0
    settings: dict[int, int] = field(default_factory=dict)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


def pack_header_block(headers: dict[str, str]) -> bytes:
    """The uncompressed name/value block: count, then length-prefixed lowercase names and values."""
    out = [struct.pack(">I", len(headers))]
    for name, value in headers.items():
        n, v = name.lower().encode(), value.encode()
        out.append(struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v)
    return b"".join(out)


def unpack_header_block(block: bytes) -> dict[str, str]:
    """Inverse of :func:`pack_header_block`; several values of one name (NUL-separated) stay joined by NUL."""
    try:
        (count,), pos = struct.unpack_from(">I", block), 4
        headers: dict[str, str] = {}
        for _ in range(count):
            (n,) = struct.unpack_from(">I", block, pos)
            name = block[pos + 4:pos + 4 + n]
            pos += 4 + n
            (v,) = struct.unpack_from(">I", block, pos)
            value = block[pos + 4:pos + 4 + v]
            pos += 4 + v
            if len(name) != n or len(value) != v:
                raise SpdyProtocolError("header block truncated")
            headers[name.decode("utf-8", "surrogateescape").lower()] = value.decode("utf-8", "surrogateescape")
    except struct.error as e:
        raise SpdyProtocolError(f"header block truncated ({e})") from e
    if pos != len(block):
        raise SpdyProtocolError(f"header block has {len(block) - pos} bytes after its {count} headers")
    return headers


class HeaderCompressor:
    """The sending side's zlib context: one per session, primed with the dictionary, never ended."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, DICTIONARY)

    def compress(self, headers: dict[str, str]) -> bytes:
        return self._z.compress(pack_header_block(headers)) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """The receiving side's zlib context; each block ends on a sync flush, so it decodes whole."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(15, zdict=DICTIONARY)

    def decompress(self, data: bytes) -> dict[str, str]:
        try:
            block = self._z.decompress(data)
        except zlib.error as e:
            raise SpdyProtocolError(f"header block does not inflate ({e})") from e
        return unpack_header_block(block)


def _control(kind: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_LENGTH:
        raise ValueError(f"control frame payload of {len(payload)} bytes is too long")
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def encode_data(stream_id: int, data: bytes = b"", *, fin: bool = False) -> bytes:
    if len(data) > MAX_LENGTH:
        raise ValueError(f"data frame of {len(data)} bytes is too long")
    return struct.pack(">II", stream_id & 0x7FFFFFFF, ((FLAG_FIN if fin else 0) << 24) | len(data)) + data


def encode(frame: Frame, compressor: HeaderCompressor | None = None) -> bytes:
    """Bytes of one frame; a compressor is needed for the kinds that carry headers."""
    k, sid = frame.kind, frame.stream_id & 0x7FFFFFFF
    if k == DATA:
        return encode_data(sid, frame.data, fin=frame.fin)
    if k in (SYN_STREAM, SYN_REPLY, HEADERS):
        if compressor is None:
            raise ValueError("a header-carrying frame needs the session's compressor")
        block = compressor.compress(frame.headers or {})
        if k == SYN_STREAM:
            head = struct.pack(">IIBB", sid, frame.value & 0x7FFFFFFF, (frame.priority & 0x7) << 5, 0)
        else:
            head = struct.pack(">I", sid)
        return _control(k, frame.flags, head + block)
    if k == RST_STREAM:
        return _control(k, 0, struct.pack(">II", sid, frame.status))
    if k == SETTINGS:
        body = struct.pack(">I", len(frame.settings))
        body += b"".join(struct.pack(">II", i & 0xFFFFFF, v) for i, v in frame.settings.items())
        return _control(k, frame.flags, body)
    if k == PING:
        return _control(k, 0, struct.pack(">I", frame.value))
    if k == GOAWAY:
        return _control(k, 0, struct.pack(">II", frame.value & 0x7FFFFFFF, frame.status))
    if k == WINDOW_UPDATE:
        return _control(k, 0, struct.pack(">II", sid, frame.value & 0x7FFFFFFF))
    raise ValueError(f"cannot encode frame kind {k}")


def _decode_control(kind: int, flags: int, body: bytes, dec: HeaderDecompressor) -> Frame | None:
    try:
        if kind == SYN_STREAM:
            sid, assoc, prio, _slot = struct.unpack_from(">IIBB", body)
            return Frame(SYN_STREAM, sid & 0x7FFFFFFF, flags, headers=dec.decompress(body[10:]),
                         value=assoc & 0x7FFFFFFF, priority=prio >> 5)
        if kind in (SYN_REPLY, HEADERS):
            (sid,) = struct.unpack_from(">I", body)
            return Frame(kind, sid & 0x7FFFFFFF, flags, headers=dec.decompress(body[4:]))
        if kind == RST_STREAM:
            sid, status = struct.unpack(">II", body)
            return Frame(RST_STREAM, sid & 0x7FFFFFFF, flags, status=status)
        if kind == SETTINGS:
            (n,) = struct.unpack_from(">I", body)
            if len(body) != 4 + 8 * n:
                raise SpdyProtocolError(f"SETTINGS frame of {len(body)} bytes for {n} entries")
            pairs = (struct.unpack_from(">II", body, 4 + 8 * i) for i in range(n))
            return Frame(SETTINGS, 0, flags, settings={i & 0xFFFFFF: v for i, v in pairs})
        if kind == PING:
            (pid,) = struct.unpack(">I", body)
            return Frame(PING, 0, flags, value=pid)
        if kind == GOAWAY:
            last, status = struct.unpack(">II", body) if len(body) == 8 else (struct.unpack(">I", body)[0], 0)
            return Frame(GOAWAY, 0, flags, value=last & 0x7FFFFFFF, status=status)
        if kind == WINDOW_UPDATE:
            sid, delta = struct.unpack(">II", body)
            return Frame(WINDOW_UPDATE, sid & 0x7FFFFFFF, flags, value=delta & 0x7FFFFFFF)
    except struct.error as e:
        raise SpdyProtocolError(f"control frame {kind} has a bad length ({len(body)} bytes)") from e
    return None  # NOOP, CREDENTIAL, unknown: the spec says ignore


class FrameParser:
    """Incremental decoder: feed bytes as they come, take the complete frames out."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._dec = HeaderDecompressor()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 8:
            word, flen = struct.unpack_from(">II", buf, pos)
            flags, length = flen >> 24, flen & 0xFFFFFF
            if len(buf) - pos < 8 + length:
                break
            body = bytes(buf[pos + 8:pos + 8 + length])
            pos += 8 + length
            if word & 0x80000000:
                version, kind = (word >> 16) & 0x7FFF, word & 0xFFFF
                if version != VERSION:
                    raise SpdyProtocolError(f"SPDY version {version} frame (expected {VERSION})")
                frame = _decode_control(kind, flags, body, self._dec)
                if frame is not None:
                    frames.append(frame)
            else:
                frames.append(Frame(DATA, word & 0x7FFFFFFF, flags, data=body))
        del buf[:pos]
        return frames


# -- the session -------------------------------------------------------------------------------

class KubeAccess(Protocol):
    host: str

    def auth_headers(self) -> dict[str, str]: ...

    def ssl_context(self) -> Any: ...

    @property
    def tls_server_name(self) -> str | None: ...


class StreamOwner(Protocol):
    """Who hears a stream's events (the port-forward transport)."""

    def _stream_data(self, stream: "SpdyStream", data: bytes) -> None: ...

    def _stream_fin(self, stream: "SpdyStream") -> None: ...

    def _stream_reset(self, stream: "SpdyStream", why: str) -> None: ...

    def _stream_sent(self, stream: "SpdyStream") -> None: ...


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # a refused stream nobody awaits must not warn "never retrieved"


class SpdyStream:
    """One SPDY stream's state: reply, windows, pending output, half-closes."""

    def __init__(self, session: "SpdySession", stream_id: int, headers: dict[str, str], owner: StreamOwner) -> None:
        self.session = session
        self.id = stream_id
        self.headers = headers
        self.owner = owner
        self.replied: asyncio.Future[None] = session.loop.create_future()
        self.replied.add_done_callback(_retrieve)
        self.send_window = session.peer_initial_window
        self.recv_window = DEFAULT_WINDOW  # what the peer may still send (tracked; see the module doc)
        self.outbuf = bytearray()
        self.fin_pending = False  # send a FIN once outbuf is out
        self.local_closed = False  # our FIN went out
        self.remote_closed = False  # the peer's FIN came
        self.reset = False
        self._unacked = 0  # consumed bytes not yet given back with WINDOW_UPDATE
        self._linger: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"SpdyStream({self.id}, {self.headers.get('streamtype')})"

    @property
    def done(self) -> bool:
        return self.reset or (self.local_closed and self.remote_closed)

    def write(self, data: bytes) -> None:
        if self.local_closed or self.fin_pending or self.reset:
            return
        self.outbuf += data
        self.session._schedule(self)

    def close_write(self) -> None:
        """Half-close: a FIN after what is buffered."""
        if self.local_closed or self.fin_pending or self.reset:
            return
        self.fin_pending = True
        self.session._schedule(self)

    def abort(self, status: int = CANCEL) -> None:
        if self.reset:
            return
        self.outbuf.clear()
        self.session._reset(self, status)

    def consumed(self, n: int) -> None:
        """The protocol took ``n`` bytes: give them back to the peer's windows."""
        self.session._session_consumed(n)
        self._unacked += n
        if self._unacked >= DEFAULT_WINDOW // 2 and not self.remote_closed and not self.reset:
            self.session._write(encode(Frame(WINDOW_UPDATE, self.id, value=self._unacked)))
            self.recv_window += self._unacked
            self._unacked = 0


class SpdySession(asyncio.Protocol):
    """A client SPDY/3.1 session on one upgraded HTTP/1.1 connection (see the module doc)."""

    def __init__(self, *, name: str = "spdy", idle_timeout: float | None = 10.0,
                 strict_flow_control: bool = False, ping_interval: float = _PING_INTERVAL,
                 ping_timeout: float = _PING_TIMEOUT) -> None:
        self.loop = asyncio.get_running_loop()
        self.name = name
        self.idle_timeout = idle_timeout
        # Enforce the peer's windows from the start (a peer known to do flow control); else from its first sign.
        self.peer_flow_control = strict_flow_control
        self.peer_initial_window = DEFAULT_WINDOW
        self.send_window = DEFAULT_WINDOW  # the 3.1 session window, for what we send
        self.recv_window = DEFAULT_WINDOW
        self._session_unacked = 0
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, SpdyStream] = {}
        self._next_id = 1  # client streams are odd
        self._next_ping = 1  # client pings are odd
        self._request_ids = itertools.count()
        self._compressor = HeaderCompressor()
        self._parser = FrameParser()
        self._ready: collections.deque[SpdyStream] = collections.deque()
        self._window_blocked: set[SpdyStream] = set()
        self._socket_paused = False
        self._reading_stalled: set[int] = set()
        self._pumping = False
        self._going_away = False  # no new streams: a GOAWAY either way, or close()
        self._lost = False
        self.error: BaseException | None = None
        self.closed = asyncio.Event()
        self._ping_interval, self._ping_timeout = ping_interval, ping_timeout
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_deadline: asyncio.TimerHandle | None = None
        self._pings: dict[int, float] = {}
        self._last_rx = self.loop.time()
        self.ping_rtt: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        # The upgrade phase: the HTTP answer is collected before frames start.
        self._head = bytearray()
        self._upgraded = False
        self._status: tuple[int, dict[str, str]] | None = None
        self._body_len: int | None = None
        self.response: asyncio.Future[tuple[int, dict[str, str], bytes]] = self.loop.create_future()
        self.response.add_done_callback(_retrieve)

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, kube: KubeAccess, namespace: str, pod: str, *, open_timeout: float = 15.0,
                      **kw: Any) -> "SpdySession":
        """Upgrade ``pods/<pod>/portforward`` to SPDY/3.1; HTTP refusals become NotFound/Forbidden/TunnelDropped."""
        what = f"port-forward (SPDY) to pod {pod!r} in namespace {namespace!r}"
        if getattr(kube, "proxy", None):
            raise ClusterUnreachable(f"{what}: the kubeconfig's proxy-url is not supported by the SPDY transport",
                                     hint="set TPENV_PORTFORWARD_PROTOCOL=websocket, or reach the API server "
                                          "without a proxy")
        url = urlsplit(kube.host)
        secure = url.scheme == "https"
        port = url.port or (443 if secure else 80)
        path = f"{url.path.rstrip('/')}/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}/portforward"
        session = cls(name=f"{namespace}/{pod}", **kw)
        ssl_kw: dict[str, Any] = {}
        ctx = kube.ssl_context()
        if ctx is not None:
            ssl_kw = {"ssl": ctx, "server_hostname": kube.tls_server_name or url.hostname}
        head = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}", "Connection: Upgrade", "Upgrade: SPDY/3.1",
                f"X-Stream-Protocol-Version: {PORTFORWARD_PROTOCOL}", "User-Agent: tpenv", "Content-Length: 0"]
        head += [f"{k}: {v}" for k, v in kube.auth_headers().items()]
        try:
            async with asyncio.timeout(open_timeout):
                await session.loop.create_connection(lambda: session, url.hostname, port, **ssl_kw)
                session._write(("\r\n".join(head) + "\r\n\r\n").encode())
                status, headers, body = await session.response
        except (OSError, TimeoutError) as e:
            session.abort()
            raise ClusterUnreachable(f"{what}: cannot reach the API server ({e.__class__.__name__}: {e})") from e
        except BaseException:
            session.abort()
            raise
        if status != 101:
            session.abort()
            text = _status_text(body) or f"HTTP {status}"
            if status == 404:
                raise NotFound(f"{what}: {text}", hint="is the pod still there? `kubectl get pods` shows it")
            if status in (401, 403):
                raise Forbidden(f"forbidden: cannot {what} ({text})",
                                hint=f"check with: kubectl auth can-i create pods/portforward -n {namespace}")
            raise TunnelDropped(f"{what}: refused (HTTP {status}: {text})")
        if headers.get("x-stream-protocol-version") != PORTFORWARD_PROTOCOL \
                or "spdy/3.1" not in headers.get("upgrade", "").lower():
            session.abort()
            raise TunnelDropped(f"{what}: the server switched to {headers.get('upgrade')!r} / "
                                f"{headers.get('x-stream-protocol-version')!r}, not SPDY/3.1 / {PORTFORWARD_PROTOCOL}")
        log.debug("[spdy/%s] session open", session.name)
        return session

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=_SOCKET_HIGH_WATER)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        self._last_rx = self.loop.time()
        if not self._upgraded:
            data = self._upgrade_received(data)
            if not data:
                return
        try:
            for frame in self._parser.feed(data):
                self._dispatch(frame)
                if self._lost:
                    return
        except SpdyProtocolError as e:
            log.warning("[spdy/%s] protocol error from the server: %s", self.name, e)
            self._goaway(PROTOCOL_ERROR)
            self._fail(TunnelDropped(f"port-forward {self.name}: SPDY protocol error from the server ({e})"))

    def eof_received(self) -> bool:
        return False  # the socket closes; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.response.done():
            if self._status is not None and self._status[0] != 101:
                self.response.set_result((*self._status, bytes(self._head)))  # a body that ran to the close
            else:
                self.response.set_exception(ConnectionResetError(f"the server closed the connection ({exc})"))
        why = f"connection to the API server lost ({exc})" if exc else "connection to the API server closed"
        self._fail(TunnelDropped(f"port-forward {self.name}: {why}"))
        self.closed.set()

    def pause_writing(self) -> None:
        self._socket_paused = True

    def resume_writing(self) -> None:
        self._socket_paused = False
        self._pump()

    # -- the upgrade answer --------------------------------------------------------------------

    def _upgrade_received(self, data: bytes) -> bytes:
        """Collect the HTTP answer; return what follows a 101's head (the first frames)."""
        self._head += data
        if self._status is None:
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 64 * 1024:
                    self.response.set_exception(ConnectionResetError("the HTTP answer's head is too long"))
                    self.abort()
                return b""
            lines = self._head[:end].decode("latin-1").split("\r\n")
            rest = bytes(self._head[end + 4:])
            try:
                status = int(lines[0].split()[1])
            except (IndexError, ValueError):
                self.response.set_exception(ConnectionResetError(f"not an HTTP answer: {lines[0][:80]!r}"))
                self.abort()
                return b""
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            self._status = (status, headers)
            self._head = bytearray(rest)
            if status == 101:
                self._upgraded = True
                self.response.set_result((status, headers, b""))
                self._ping_timer = self.loop.call_later(self._ping_interval, self._send_ping)
                return rest
            if headers.get("content-length", "").isdigit():
                self._body_len = int(headers["content-length"])
        if self._body_len is not None and len(self._head) >= self._body_len and not self.response.done():
            self.response.set_result((*self._status, bytes(self._head[:self._body_len])))
        return b""

    # -- streams -------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open for new streams (upgraded, not lost, no GOAWAY either way)."""
        return self._upgraded and not self._lost and not self._going_away

    def open_stream(self, headers: dict[str, str], owner: StreamOwner) -> SpdyStream:
        """Send SYN_STREAM; ``stream.replied`` resolves on SYN_REPLY (fails on RST_STREAM or loss)."""
        if not self.usable:
            raise TunnelDropped(f"port-forward {self.name}: the SPDY session is closing")
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        sid = self._next_id
        self._next_id += 2
        stream = SpdyStream(self, sid, headers, owner)
        self.streams[sid] = stream
        self._write(encode(Frame(SYN_STREAM, sid, headers=headers), self._compressor))
        return stream

    def next_request_id(self) -> str:
        return str(next(self._request_ids))

    def _schedule(self, stream: SpdyStream) -> None:
        if stream not in self._ready:
            self._ready.append(stream)
        self._pump()

    def _pump(self) -> None:
        """Turn pending stream output into DATA frames, round robin, while the socket and windows allow."""
        if self._pumping or self._lost or self.transport is None:
            return
        self._pumping = True
        try:
            while self._ready and not self._socket_paused:
                s = self._ready.popleft()
                if s.reset or s.local_closed or not s.replied.done():
                    continue  # a stream goes on the wire after its SYN_REPLY, which reschedules it
                n = min(len(s.outbuf), _MAX_DATA_FRAME)
                if self.peer_flow_control:
                    n = max(0, min(n, s.send_window, self.send_window))
                if n == 0 and s.outbuf:
                    self._window_blocked.add(s)  # a WINDOW_UPDATE or SETTINGS reschedules it
                    continue
                chunk = bytes(s.outbuf[:n])
                del s.outbuf[:n]
                fin = s.fin_pending and not s.outbuf
                self.transport.write(encode_data(s.id, chunk, fin=fin))
                s.send_window -= n
                self.send_window -= n
                if fin:
                    s.local_closed, s.fin_pending = True, False
                    self._maybe_forget(s)
                elif s.outbuf or s.fin_pending:
                    self._ready.append(s)
                s.owner._stream_sent(s)
        finally:
            self._pumping = False

    def _unblock(self) -> None:
        blocked, self._window_blocked = self._window_blocked, set()
        for s in blocked:
            if s.id in self.streams and s not in self._ready:
                self._ready.append(s)
        self._pump()

    def _dispatch(self, f: Frame) -> None:
        k = f.kind
        if k == DATA:
            self.recv_window -= len(f.data)
            s = self.streams.get(f.stream_id)
            if s is None or s.reset:
                self._session_consumed(len(f.data))  # late data for a stream we dropped
                return
            s.recv_window -= len(f.data)
            if f.data:
                s.owner._stream_data(s, f.data)
            if f.fin:
                self._remote_fin(s)
        elif k == SYN_REPLY:
            s = self.streams.get(f.stream_id)
            if s is not None and not s.replied.done():
                s.replied.set_result(None)
                if s.outbuf or s.fin_pending:
                    self._schedule(s)
                if f.fin:
                    self._remote_fin(s)
        elif k == HEADERS:
            s = self.streams.get(f.stream_id)
            if s is not None and f.fin:
                self._remote_fin(s)
        elif k == RST_STREAM:
            s = self.streams.pop(f.stream_id, None)
            if s is not None:
                self._peer_reset(s, _RST_NAMES.get(f.status, f"status {f.status}"))
                self._maybe_idle()
        elif k == SETTINGS:
            new = f.settings.get(SETTINGS_INITIAL_WINDOW_SIZE)
            if new is not None:
                self.peer_flow_control = True
                delta, self.peer_initial_window = new - self.peer_initial_window, new
                for s in self.streams.values():
                    s.send_window += delta
                self._unblock()
        elif k == PING:
            if f.value % 2 == 0:  # the server's ping: echo it
                self._write(encode(Frame(PING, value=f.value)))
            elif (sent := self._pings.pop(f.value, None)) is not None:
                self.ping_rtt = self.loop.time() - sent
                if not self._pings and self._ping_deadline is not None:
                    self._ping_deadline.cancel()
                    self._ping_deadline = None
        elif k == GOAWAY:
            self._going_away = True
            log.debug("[spdy/%s] GOAWAY from the server (last good stream %d, status %d)",
                      self.name, f.value, f.status)
            for sid in [sid for sid in self.streams if sid > f.value]:
                self._peer_reset(self.streams.pop(sid), "the server is going away (GOAWAY)")
            self._maybe_idle()
        elif k == WINDOW_UPDATE:
            self.peer_flow_control = True
            if f.stream_id == 0:
                self.send_window += f.value
            elif (s := self.streams.get(f.stream_id)) is not None:
                s.send_window += f.value
            # else: a late update for a finished stream; ignored (draft 3, 2.6.8)
            self._unblock()
        elif k == SYN_STREAM:  # a server push has no use in port-forward
            self._write(encode(Frame(RST_STREAM, f.stream_id, status=REFUSED_STREAM)))

    def _peer_reset(self, s: SpdyStream, why: str) -> None:
        s.reset = True
        if s._linger is not None:
            s._linger.cancel()
        if not s.replied.done():
            s.replied.set_exception(TunnelDropped(f"port-forward {self.name}: stream refused ({why})"))
        s.owner._stream_reset(s, why)

    def _remote_fin(self, s: SpdyStream) -> None:
        if s.remote_closed:
            return
        s.remote_closed = True
        s.owner._stream_fin(s)
        self._maybe_forget(s)

    def _maybe_forget(self, s: SpdyStream) -> None:
        if s.done:
            self.streams.pop(s.id, None)
            if s._linger is not None:
                s._linger.cancel()
            self._maybe_idle()
        elif s.local_closed and s._linger is None and not self._lost:
            # Our side is done; a peer that never ends its side would keep the stream forever.
            s._linger = self.loop.call_later(_CLOSE_LINGER, s.abort)

    def _reset(self, s: SpdyStream, status: int) -> None:
        s.reset = True
        if s._linger is not None:
            s._linger.cancel()
        self.streams.pop(s.id, None)
        self._write(encode(Frame(RST_STREAM, s.id, status=status)))
        self._maybe_idle()

    def _session_consumed(self, n: int) -> None:
        self._session_unacked += n
        if self._session_unacked >= DEFAULT_WINDOW // 2:
            self._write(encode(Frame(WINDOW_UPDATE, 0, value=self._session_unacked)))
            self.recv_window += self._session_unacked
            self._session_unacked = 0

    def stall_reading(self, s: SpdyStream, stalled: bool) -> None:
        """A paused reader has too much buffered: stop (or restart) reading the whole socket."""
        if stalled:
            self._reading_stalled.add(s.id)
        else:
            self._reading_stalled.discard(s.id)
        t = self.transport
        if t is None or self._lost or t.is_closing():
            return
        if self._reading_stalled and t.is_reading():
            t.pause_reading()
        elif not self._reading_stalled and not t.is_reading():
            t.resume_reading()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self._lost and not self.transport.is_closing():
            self.transport.write(data)

    # -- keepalive, idle -----------------------------------------------------------------------

    def _send_ping(self) -> None:
        if self._lost:
            return
        pid = self._next_ping
        self._next_ping += 2
        self._pings[pid] = self.loop.time()
        self._write(encode(Frame(PING, value=pid)))
        if self._ping_deadline is None:
            self._ping_deadline = self.loop.call_later(self._ping_timeout, self._ping_overdue)
        self._ping_timer = self.loop.call_later(self._ping_interval, self._send_ping)

    def _ping_overdue(self) -> None:
        self._ping_deadline = None
        quiet = self.loop.time() - self._last_rx
        if quiet < self._ping_timeout:
            # Frames keep coming, the answer is just queued behind them (spdystream answers from a
            # worker that a slow stream can hold up): still alive.
            self._ping_deadline = self.loop.call_later(self._ping_timeout - quiet, self._ping_overdue)
            return
        self._fail(TunnelDropped(f"port-forward {self.name}: the API server sent nothing, not even a ping "
                                 f"answer, for {quiet:.0f}s"))

    def _maybe_idle(self) -> None:
        if self.streams or self._lost:
            return
        if self._going_away:
            self.close()
        elif self.idle_timeout is not None and self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.idle_timeout, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if not self.streams:
            log.debug("[spdy/%s] idle for %.0fs: closing", self.name, self.idle_timeout)
            self.close()

    # -- closing -------------------------------------------------------------------------------

    def _goaway(self, status: int = 0) -> None:
        if self._upgraded:
            self._write(encode(Frame(GOAWAY, value=0, status=status)))  # we accepted no server stream

    def close(self) -> None:
        """GOAWAY, then close the socket after what it has buffered; open streams are cut. Safe twice."""
        if self._lost:
            return
        self._going_away = True
        self._goaway()
        self._fail(None)
        if self.transport is None:
            self.closed.set()
        else:
            self.transport.close()  # connection_lost sets `closed` after the flush

    def abort(self) -> None:
        self._fail(None)
        if self.transport is not None:
            self.transport.abort()
        else:
            self.closed.set()

    def _fail(self, exc: BaseException | None) -> None:
        """End the session; every open stream hears why (exc, or 'closed')."""
        if self._lost:
            return
        self._lost = True
        self.error = exc
        for t in (self._ping_timer, self._ping_deadline, self._idle_timer):
            if t is not None:
                t.cancel()
        streams, self.streams = list(self.streams.values()), {}
        why = str(exc) if exc is not None else f"port-forward {self.name}: the SPDY session was closed"
        for s in streams:
            self._peer_reset(s, why)
        if exc is not None and self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        await self.closed.wait()


_RST_NAMES = {1: "PROTOCOL_ERROR", 2: "INVALID_STREAM", 3: "REFUSED_STREAM", 4: "UNSUPPORTED_VERSION",
              5: "CANCEL", 6: "INTERNAL_ERROR", 7: "FLOW_CONTROL_ERROR", 8: "STREAM_IN_USE",
              9: "STREAM_ALREADY_CLOSED", 10: "INVALID_CREDENTIALS", 11: "FRAME_TOO_LARGE"}


def _status_text(body: bytes) -> str:
    """The ``message`` of a Kubernetes Status JSON body, or the body itself."""
    import json

    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
    except ValueError:
        pass
    return text[:300]


# -- port-forward over the session ---------------------------------------------------------------

class SpdyPortForwardTransport(asyncio.Transport):
    """One port-forwarded TCP stream (an error and a data SPDY stream) as an asyncio Transport.

    Events reach the protocol only after its connection_made (frames right behind the SYN_REPLY
    may arrive first: they wait in the buffer), and connection_lost comes from the loop, never
    from inside a call the protocol made (as with asyncio's own transports).
    """

    def __init__(self, session: SpdySession, protocol: asyncio.BaseProtocol, port: int, *,
                 name: str, peer: tuple[str, int],
                 on_lost: Callable[["SpdyPortForwardTransport"], None] | None = None) -> None:
        super().__init__()
        self._session = session
        self._loop = session.loop
        self._protocol = protocol
        self._name = name
        self._on_lost = on_lost
        self._extra = {"peername": peer, "sockname": ("portforward-spdy", 0)}
        self._made = False
        self._closing = False
        self._lost = False
        self._lost_exc: BaseException | None = None
        self._eof_written = False
        self._paused = False
        self._writing_paused = False
        self._inbuf: collections.deque[bytes] = collections.deque()
        self._inbuf_len = 0
        self._end_pending = False  # the far side ended; report it once the buffer is delivered
        self._end_exc: BaseException | None = None
        self._error_text = ""
        self._done = asyncio.Event()
        rid = session.next_request_id()
        base = {"port": str(port), "requestid": rid}
        self.error_stream = session.open_stream({"streamtype": "error", **base}, self)
        self.data_stream = session.open_stream({"streamtype": "data", **base}, self)
        self.error_stream.close_write()  # as client-go: we never write to the error stream

    async def _opened(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(self.error_stream.replied, self.data_stream.replied)
        except TimeoutError as e:
            self.abort()
            raise TunnelDropped(f"port-forward {self._name}: no SYN_REPLY from the server in {timeout:.0f}s") from e
        except BaseException:
            self.abort()
            raise

    def _connection_made(self) -> None:
        self._made = True
        self._protocol.connection_made(self)
        if self._lost:
            self._loop.call_soon(self._call_connection_lost)
        elif self._inbuf or self._end_pending:
            self._loop.call_soon(self._deliver)

    # -- asyncio.Transport -------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_reading(self) -> bool:
        return not self._paused

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._inbuf or self._end_pending:
            self._loop.call_soon(self._deliver)

    def can_write_eof(self) -> bool:
        return True  # a FIN on the data stream; the kubelet half-closes toward the pod

    def write_eof(self) -> None:
        if self._closing or self._lost or self._eof_written:
            return
        self._eof_written = True
        self.data_stream.close_write()

    def get_write_buffer_size(self) -> int:
        return len(self.data_stream.outbuf)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return _LOW_WATER, _HIGH_WATER

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or self._eof_written or not data:
            return
        self.data_stream.write(bytes(data))
        if not self._writing_paused and len(self.data_stream.outbuf) > _HIGH_WATER:
            self._writing_paused = True
            self._protocol.pause_writing()

    def close(self) -> None:
        """Send what is buffered, then a FIN; connection_lost(None) follows. Safe twice."""
        if self._closing or self._lost:
            return
        self._closing = True
        self._inbuf.clear()
        self._inbuf_len = 0
        self._session.stall_reading(self.data_stream, False)
        if not self._eof_written:
            self._eof_written = True
            self.data_stream.close_write()
        self._lost_if_flushed()

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        self.data_stream.abort()
        self.error_stream.abort()
        self._session.stall_reading(self.data_stream, False)
        self._finish(None)

    async def wait_closed(self) -> None:
        await self._done.wait()

    # -- events from the streams -----------------------------------------------------------

    def _stream_sent(self, stream: SpdyStream) -> None:
        if stream is not self.data_stream:
            return
        if self._writing_paused and len(stream.outbuf) <= _LOW_WATER:
            self._writing_paused = False
            self._protocol.resume_writing()
        self._lost_if_flushed()

    def _stream_data(self, stream: SpdyStream, data: bytes) -> None:
        if stream is self.error_stream:
            self._error_text += data.decode("utf-8", "replace")
            stream.consumed(len(data))
        elif self._closing or self._lost:
            stream.consumed(len(data))  # like a socket transport: no data_received after close()
        elif self._paused or self._inbuf or not self._made:
            self._inbuf.append(data)
            self._inbuf_len += len(data)
            if self._inbuf_len > _STALL_LIMIT:
                self._session.stall_reading(stream, True)
        else:
            self._protocol.data_received(data)  # type: ignore[attr-defined]
            stream.consumed(len(data))

    def _deliver(self) -> None:
        while self._inbuf and not self._paused and not self._closing and self._made:
            data = self._inbuf.popleft()
            self._inbuf_len -= len(data)
            self._protocol.data_received(data)  # type: ignore[attr-defined]
            self.data_stream.consumed(len(data))
        if self._inbuf_len <= _STALL_LIMIT // 2:
            self._session.stall_reading(self.data_stream, False)
        if not self._inbuf and self._end_pending and not self._paused and self._made:
            self._end_pending = False
            self._end(self._end_exc)

    def _stream_fin(self, stream: SpdyStream) -> None:
        if stream is self.error_stream:
            if self._error_text.strip():  # the pod side failed (nothing listens, pod gone...)
                self._end(TunnelDropped(f"port-forward {self._name}: {self._error_text.strip()}"))
            return
        if self._error_text.strip():  # the error stream's text came without its FIN yet
            self._end(TunnelDropped(f"port-forward {self._name}: {self._error_text.strip()}"))
        else:
            self._end(None)  # the pod side's EOF

    def _stream_reset(self, stream: SpdyStream, why: str) -> None:
        if self._error_text.strip():
            exc = TunnelDropped(f"port-forward {self._name}: {self._error_text.strip()}")
        elif why.startswith("port-forward "):
            exc = TunnelDropped(why)  # the session's own words (lost, closed, protocol error)
        else:
            exc = TunnelDropped(f"port-forward {self._name}: stream reset by the server ({why})")
        self._end(exc, now=True)

    def _end(self, exc: BaseException | None, *, now: bool = False) -> None:
        """The far side ended: EOF (exc None) or a failure, reported after the buffered data."""
        if self._lost:
            return
        if not now and (self._inbuf or not self._made) and not self._closing:
            # A failure beats a clean end that follows it (the error stream's FIN, then the data's).
            self._end_pending, self._end_exc = True, self._end_exc or exc
            return
        if exc is not None:
            self.data_stream.abort()
            self.error_stream.abort()
            self._finish(exc)
            return
        if self._closing:
            self._lost_if_flushed()
            return
        # The pod side ended cleanly: tell the protocol like a TCP FIN.
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a protocol's bug must not hide the close
            log.exception("[spdy/%s] eof_received failed", self._name)
            keep_open = False
        if not keep_open:
            self.close()

    def _lost_if_flushed(self) -> None:
        if self._closing and not self._lost and (self.data_stream.local_closed or self.data_stream.reset):
            self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._lost_exc = exc
        self._inbuf.clear()
        if exc is not None:
            log.debug("[spdy/%s] dropped: %s", self._name, exc)
        if self._on_lost is not None:
            self._on_lost(self)
        if self._made:
            self._loop.call_soon(self._call_connection_lost)
        else:
            self._done.set()  # connection_made comes later (or never, when opening failed)

    def _call_connection_lost(self) -> None:
        try:
            self._protocol.connection_lost(self._lost_exc)
        finally:
            self._done.set()


async def open_portforward(session: SpdySession, protocol_factory: Callable[[], asyncio.BaseProtocol], port: int,
                           *, name: str, peer: tuple[str, int], open_timeout: float = 15.0,
                           on_lost: Callable[[SpdyPortForwardTransport], None] | None = None,
                           ) -> tuple[SpdyPortForwardTransport, asyncio.BaseProtocol]:
    """A new TCP stream to ``port`` in the session's pod; connection_made once both streams are replied."""
    protocol = protocol_factory()
    transport = SpdyPortForwardTransport(session, protocol, port, name=name, peer=peer, on_lost=on_lost)
    await transport._opened(open_timeout)
    transport._connection_made()
    return transport, protocol


__all__ = ["SpdySession", "SpdyStream", "SpdyPortForwardTransport", "open_portforward", "Frame", "FrameParser",
           "HeaderCompressor", "HeaderDecompressor", "encode", "encode_data", "pack_header_block",
           "unpack_header_block", "DICTIONARY", "PORTFORWARD_PROTOCOL", "SpdyProtocolError"]
