"""The client side of one SPDY/3.1 session on an upgraded HTTP/1.1 connection to the API server.

One session carries many streams, so one TLS connection and one upgrade
(:mod:`tpenv.kits.spdy_upgrade`) serve every stream of a
:class:`~tpenv.kits.portforward.PodTunnel` (WebSocket needs one per TCP stream). Here: the
reader (bytes to frames, :mod:`tpenv.kits.spdy_frames`, dispatched to the stream table),
DATA frames made round robin from the streams' output, pings (the server's answered, ours
by :mod:`tpenv.kits.spdy_keepalive`), GOAWAY either way, and the close when idle: a session with no streams closes
itself after ``idle_timeout``.

Flow control: we keep both SPDY/3.1 windows (per stream and per session, 64 KiB initial
unless the peer's SETTINGS say otherwise) and send WINDOW_UPDATE as the protocol consumes.
The peer's windows are enforced as soon as the peer shows it does flow control (a
WINDOW_UPDATE or an INITIAL_WINDOW_SIZE setting). The kubelet's spdystream does neither
(moby/spdystream#2 "Implement flow control" is open; it ignores WINDOW_UPDATE and never
sends one), and kubectl does not enforce windows against it: enforcing the default 64 KiB
there would stall every stream after 64 KiB. Against such a peer, backpressure is TCP's:
frames go out only while the TLS socket's buffer is below its high-water mark, and a stream
whose reader paused buffers up to a limit before the whole socket stops reading
(:meth:`SpdySession.stall_reading`; what spdystream itself does: its frame handler blocks on
a slow stream).

Everything runs in callbacks of one asyncio Protocol: no task or thread per stream.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from typing import TYPE_CHECKING, Any

from tpenv.errors import ClusterUnreachable, TunnelDropped
from tpenv.kits.spdy_frames import (DEFAULT_WINDOW, GOAWAY, PING, PROTOCOL_ERROR, RST_STREAM, SYN_STREAM, WINDOW_UPDATE,
                                    Frame, FrameParser, HeaderCompressor, SpdyProtocolError, data_head, encode)
from tpenv.kits.spdy_dispatch import FrameDispatch
from tpenv.kits.spdy_keepalive import Keepalive
from tpenv.kits.spdy_stream import SpdyStream, StreamOwner, quiet_future
from tpenv.kits.pf_common import UpgradeAnswer
from tpenv.kits.spdy_upgrade import refusal, upgrade_request

if TYPE_CHECKING:
    from tpenv.kits.portforward import KubeAccess

log = logging.getLogger("tpenv.spdy.session")

_MAX_DATA_FRAME = 32 * 1024  # small enough that streams interleave fairly on the one socket
_SOCKET_HIGH_WATER = 256 * 1024  # stop making DATA frames while the TLS socket holds this much
_PING_INTERVAL = 15.0
_PING_TIMEOUT = 15.0
_CLOSE_LINGER = 30.0  # after our FIN, how long a stream waits for the peer's before it is reset


class SpdySession(FrameDispatch, asyncio.Protocol):
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
        self.keepalive = Keepalive(self.loop, self._send_ping, self._quiet, interval=ping_interval,
                                   timeout=ping_timeout)
        self._idle_timer: asyncio.TimerHandle | None = None
        self._pass: dict[Any, None] | None = None  # during a read: owners holding data until its end
        self._ctl: list[bytes] | None = None  # during a read: window updates to write at its end
        # The upgrade phase: the HTTP answer is collected before frames start.
        self._answer = UpgradeAnswer()
        self._upgraded = False
        self.response: asyncio.Future[tuple[int, dict[str, str], bytes]] = quiet_future(self.loop)

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, kube: KubeAccess, namespace: str, pod: str, *, open_timeout: float = 15.0,
                      **kw: Any) -> SpdySession:
        """Upgrade ``pods/<pod>/portforward`` to SPDY/3.1; HTTP refusals become NotFound/Forbidden/TunnelDropped."""
        what = f"port-forward (SPDY) to pod {pod!r} in namespace {namespace!r}"
        host, port, ssl_kw, request = upgrade_request(kube, namespace, pod, what)
        session = cls(name=f"{namespace}/{pod}", **kw)
        try:
            async with asyncio.timeout(open_timeout):
                await session.loop.create_connection(lambda: session, host, port, **ssl_kw)
                session._write(request)
                status, headers, body = await session.response
        except (OSError, TimeoutError) as e:
            session.abort()
            raise ClusterUnreachable(f"{what}: cannot reach the API server ({e.__class__.__name__}: {e})") from e
        except BaseException:
            session.abort()
            raise
        if (err := refusal(what, namespace, status, headers, body)) is not None:
            session.abort()
            raise err
        log.debug("[spdy/%s] session open", session.name)
        return session

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=_SOCKET_HIGH_WATER)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        self.keepalive.received()
        if not self._upgraded:
            data = self._upgrade_received(data)
            if not data:
                return
        # One read, one pass: each stream's data of the read reaches its protocol at once, and the
        # window updates it earns go out in one write (per 32 KiB frame, they were a data_received,
        # a send to the local socket and two TLS records with a send each).
        self._pass, self._ctl = {}, []
        try:
            for frame in self._parser.feed(data):
                self._dispatch(frame)
                if self._lost:
                    return
        except SpdyProtocolError as e:
            log.warning("[spdy/%s] protocol error from the server: %s", self.name, e)
            self._goaway(PROTOCOL_ERROR)
            self._fail(TunnelDropped(f"port-forward {self.name}: SPDY protocol error from the server ({e})"))
        finally:
            held, self._pass = self._pass, None
            for owner in held:
                owner._pass_end()
            ctl, self._ctl = self._ctl, None
            if ctl:
                self._writelines(ctl)

    def hold(self, owner: Any) -> bool:
        """Inside a read: ``owner`` keeps its data until the read's end (``owner._pass_end()``)."""
        if self._pass is None:
            return False
        self._pass[owner] = None
        return True

    def write_control(self, data: bytes) -> None:
        """A control frame that may wait for the end of the current read (window updates)."""
        if self._ctl is not None:
            self._ctl.append(data)
        else:
            self._write(data)

    def eof_received(self) -> bool:
        return False  # the socket closes; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.response.done():
            if (refused := self._answer.refused(at_close=True)) is not None:
                self.response.set_result(refused)  # a body that ran to the close
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
        try:
            rest = self._answer.feed(data)
        except ConnectionResetError as e:
            self.response.set_exception(e)
            self.abort()
            return b""
        if self._answer.status == 101:
            self._upgraded = True
            self.response.set_result((101, self._answer.headers, b""))
            self.keepalive.start()
            return rest
        if (refused := self._answer.refused()) is not None and not self.response.done():
            self.response.set_result(refused)
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
        out: list[bytes | memoryview] = []  # this pass's frames: one write for all (one TLS flush, one send)
        size = 0
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
                pieces = s.outbuf.take(n)
                fin = s.fin_pending and not s.outbuf
                out.append(data_head(s.id, n, fin=fin))
                out += pieces
                size += n
                if size >= _SOCKET_HIGH_WATER:  # out now, so the transport's marks can pause this loop
                    self.transport.writelines(out)
                    out, size = [], 0
                s.send_window -= n
                self.send_window -= n
                if fin:
                    s.local_closed, s.fin_pending = True, False
                    self._maybe_forget(s)
                elif s.outbuf or s.fin_pending:
                    self._ready.append(s)
                s.owner._stream_sent(s)
        finally:
            if out and not self._lost:
                self.transport.writelines(out)
            self._pumping = False

    def _unblock(self) -> None:
        blocked, self._window_blocked = self._window_blocked, set()
        for s in blocked:
            if s.id in self.streams and s not in self._ready:
                self._ready.append(s)
        self._pump()

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
        s.mark_reset()
        self.streams.pop(s.id, None)
        self._write(encode(Frame(RST_STREAM, s.id, status=status)))
        self._maybe_idle()

    def _session_consumed(self, n: int) -> None:
        self._session_unacked += n
        if self._session_unacked >= DEFAULT_WINDOW // 2:
            self.write_control(encode(Frame(WINDOW_UPDATE, 0, value=self._session_unacked)))
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

    def _writelines(self, data: list[bytes]) -> None:
        if self.transport is not None and not self._lost and not self.transport.is_closing():
            self.transport.writelines(data)

    # -- keepalive, idle -----------------------------------------------------------------------

    def _send_ping(self, ping_id: int) -> None:
        self._write(encode(Frame(PING, value=ping_id)))

    def _quiet(self, seconds: float) -> None:
        self._fail(TunnelDropped(f"port-forward {self.name}: the API server sent nothing, not even a ping "
                                 f"answer, for {seconds:.0f}s"))

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
        self.keepalive.stop()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        streams, self.streams = list(self.streams.values()), {}
        why = str(exc) if exc is not None else f"port-forward {self.name}: the SPDY session was closed"
        for s in streams:
            self._peer_reset(s, why)
        if exc is not None and self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        await self.closed.wait()

