"""A minimal RFC 6455 client connection on an asyncio ``BufferedProtocol``: the port-forward byte path.

:class:`WsConnection` opens TCP (directly, or through the kubeconfig's HTTP(S) ``proxy-url``
with CONNECT: :mod:`tpenv.kits.ws_handshake`), TLS, and the HTTP/1.1 upgrade (``Sec-WebSocket-Key``/``-Accept``, one
subprotocol), then carries binary messages both ways for a *handler* (the port-forward
transport, :class:`tpenv.kits.portforward.PortForwardTransport`):

- reading: TLS decrypts into the frame parser's buffer (:mod:`tpenv.kits.ws_frames`), the
  handler gets each message's bytes as pieces of it (``ws_piece``) and, after each read, one
  ``ws_batch_end`` to hand them on in one copy. No task, queue or future per message.
- writing: :meth:`write` queues; once per event-loop pass (or at once when a frame is full) the queue becomes masked frames
  of at most ``max_frame`` bytes, each message starting with ``prefix`` (the port-forward
  channel byte), handed to the TLS transport in one ``writelines``: small writes of one pass
  share a frame and a TLS record.
- backpressure: the TLS transport's write-buffer marks pause and resume the handler's writer
  (``ws_pause_writing``/``ws_resume_writing``); :meth:`pause_reading` stops reading the socket,
  so a slow reader holds at most one read (256 KiB) here and TCP holds the rest.
- pings of the server answered, our own keepalive pings (:class:`tpenv.kits.spdy_keepalive.Keepalive`:
  any byte from the server counts as life; silence while *we* paused reading does not count),
  the close handshake either way, and ``ws_closed(exc)`` once at the end: ``None`` after a
  clean close (codes 1000, 1001, none), else TunnelDropped saying why.
"""
from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from typing import Any, Protocol
from urllib.parse import urlsplit

from tpenv.errors import TunnelDropped
from tpenv.kits import ws_frames as wf
from tpenv.kits.pf_common import HIGH_WATER, LOW_WATER, UpgradeAnswer
from tpenv.kits.spdy_keepalive import Keepalive
from tpenv.kits.ws_handshake import connect_via_proxy, upgrade_request

log = logging.getLogger("tpenv.websocket")

_CLOSE_TIMEOUT = 10.0  # after our close frame, how long we wait for the server's before aborting


class UpgradeRefused(TunnelDropped):
    """The server answered the WebSocket upgrade with a status other than 101 (the caller maps it)."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"the WebSocket upgrade was refused (HTTP {status})")
        self.status, self.headers, self.body = status, headers, body


class WsHandler(Protocol):
    def ws_piece(self, first: bool, piece: memoryview) -> None: ...

    def ws_batch_end(self) -> None: ...

    def ws_closed(self, exc: BaseException | None) -> None: ...

    def ws_pause_writing(self) -> None: ...

    def ws_resume_writing(self) -> None: ...


class WsConnection(asyncio.BufferedProtocol):
    """One client WebSocket (see the module doc). Open with :meth:`open`, then :meth:`start` a handler."""

    def __init__(self, *, name: str = "websocket", prefix: bytes = b"", max_frame: int = 64 * 1024,
                 write_limits: tuple[int, int] = (HIGH_WATER, LOW_WATER), ping_interval: float = 15.0,
                 ping_timeout: float = 15.0) -> None:
        self.loop = asyncio.get_running_loop()
        self.name = name
        self.prefix, self.max_frame, self._limits = prefix, max_frame, write_limits
        self.transport: asyncio.Transport | None = None
        self.subprotocol: str | None = None
        self._handler: WsHandler | None = None
        self._parser = wf.FrameParser(self._early_piece, self._control)
        self._answer: UpgradeAnswer | None = UpgradeAnswer()  # None once upgraded
        self._scratch = memoryview(bytearray(16 * 1024))  # the HTTP answer is read here
        self._expect: tuple[bytes, str] = (b"", "")  # (Sec-WebSocket-Accept, subprotocol)
        self._upgraded: asyncio.Future[None] = self.loop.create_future()
        self._out: list[bytes] = []  # data written since the last flush
        self._out_len = 0
        self._flush_handle: asyncio.Handle | None = None
        self._paused = False  # reading paused by the handler
        self._wpaused = False  # the handler's writing paused by us
        self._close_sent = False
        self._close_rcvd: tuple[int, str] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._error: BaseException | None = None
        self._outcome: BaseException | None = None  # what ws_closed says (kept for a late start())
        self._done = False
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.keepalive = Keepalive(self.loop, self._send_ping, self._quiet, interval=ping_interval,
                                   timeout=ping_timeout)

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, *, subprotocol: str, headers: dict[str, str], ssl: Any = None,
                   server_hostname: str | None = None, proxy: str | None = None, open_timeout: float = 15.0,
                   **kw: Any) -> WsConnection:
        """Connect and upgrade. Raises UpgradeRefused for a non-101 answer, WebSocketProtocolError for
        a 101 that is not the WebSocket we asked for, OSError/TimeoutError when the server is not reached."""
        conn = cls(**kw)
        u = urlsplit(url)
        secure = u.scheme in ("wss", "https")
        host, port = u.hostname or "localhost", u.port or (443 if secure else 80)
        if secure and ssl is None:
            ssl = ssl_module.create_default_context()
        request, accept = upgrade_request(url, subprotocol, headers)
        conn._expect = (accept, subprotocol)
        try:
            async with asyncio.timeout(open_timeout):
                if proxy:
                    await connect_via_proxy(conn, proxy, host, port, ssl if secure else None, server_hostname)
                else:
                    await conn.loop.create_connection(lambda: conn, host, port, ssl=ssl if secure else None,
                                                      server_hostname=(server_hostname or host) if secure else None)
                assert conn.transport is not None
                conn.transport.write(request)
                await conn._upgraded
        except BaseException:
            conn.abort()
            raise
        return conn

    def start(self, handler: WsHandler) -> None:
        """Hand the messages (from the first frame on, some may have come with the 101) to ``handler``;
        if the connection already ended, the frames read before the end, then ``ws_closed``."""
        self._handler = handler
        self._parser.on_piece = handler.ws_piece
        try:
            self._parser.parse()
        except wf.WebSocketProtocolError as e:
            self._fail(e)
        handler.ws_batch_end()
        if self._done:
            handler.ws_closed(self._outcome)
            return
        self.keepalive.start()
        # Closed by its user before the start came round (a port probed and let go at once):
        # an SSL transport being closed has no reading to resume.
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _early_piece(self, first: bool, piece: memoryview) -> None:
        raise AssertionError("frames are parsed only once a handler is started")

    # -- asyncio.BufferedProtocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(*self._limits)  # type: ignore[union-attr]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._scratch if self._answer is not None else self._parser.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._answer is not None:
            self._answer_read(bytes(self._scratch[:nbytes]))
            return
        self.keepalive.last_rx = self.loop.time()  # Keepalive.received(), inlined: once per read
        try:
            self._parser.feed(nbytes)
        except wf.WebSocketProtocolError as e:
            self._fail(e)
        if self._handler is not None:
            self._handler.ws_batch_end()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost says how it ended

    def connection_lost(self, exc: Exception | None) -> None:
        if self._answer is not None and not self._upgraded.done():
            refused = self._answer.refused(at_close=True)
            self._upgraded.set_exception(UpgradeRefused(*refused) if refused else
                                         exc or ConnectionResetError("the server closed before answering the upgrade"))
        self._end(exc)

    def pause_writing(self) -> None:
        if not self._wpaused and self._handler is not None:
            self._wpaused = True
            self._handler.ws_pause_writing()

    def resume_writing(self) -> None:
        if self._wpaused and self._handler is not None:
            self._wpaused = False
            self._handler.ws_resume_writing()

    def _answer_read(self, data: bytes) -> None:
        assert self._answer is not None
        try:
            rest = self._answer.feed(data)
        except ConnectionResetError as e:
            self._upgraded.set_exception(e)
            self.abort()
            return
        if self._answer.status is None:
            return
        if self._answer.status != 101:
            if (refused := self._answer.refused()) is not None and not self._upgraded.done():
                self._upgraded.set_exception(UpgradeRefused(*refused))
                self.abort()
            return
        headers, (accept, subprotocol) = self._answer.headers, self._expect
        chosen = headers.get("sec-websocket-protocol") or None
        if headers.get("upgrade", "").lower() != "websocket" or headers.get("sec-websocket-accept", "").encode() != accept \
                or chosen not in (None, subprotocol):
            self._upgraded.set_exception(wf.WebSocketProtocolError(
                f"the server's 101 is not the WebSocket asked for (upgrade {headers.get('upgrade')!r}, "
                f"subprotocol {chosen!r})"))
            self.abort()
            return
        self.subprotocol, self._answer = chosen, None
        self._parser.load(rest)  # the first frames, when they came with the answer's head
        assert self.transport is not None
        self.transport.pause_reading()  # until start(): no frame is parsed without its handler
        self._upgraded.set_result(None)

    # -- frames from the server ------------------------------------------------------------------

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == wf.PING:
            self._send_frame(wf.PONG, payload)
        elif opcode == wf.PONG:
            if len(payload) == 4:
                self.keepalive.answered(int.from_bytes(payload, "big"))
        elif opcode == wf.CLOSE:
            self._close_rcvd = wf.parse_close(payload)
            if not self._close_sent:
                self._flush()
                self._send_frame(wf.CLOSE, payload[:2])  # echo the code, as RFC 6455 5.5.1 asks
            if self.transport is not None:
                self.transport.close()  # the server has ended its side: nothing more will come

    # -- writing -------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` as message bytes; the queue goes out as frames once per loop pass."""
        if self._close_sent or self._done or not data:
            return
        self._out.append(data if isinstance(data, bytes) else bytes(data))  # the caller may reuse its buffer
        self._out_len += len(data)
        if self._out_len >= self.max_frame:
            self._flush()  # a frame's worth: out now, so the TLS transport's marks see it (backpressure)
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def get_write_buffer_size(self) -> int:
        tls = self.transport.get_write_buffer_size() if self.transport is not None and not self._done else 0
        return self._out_len + tls

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._out or self.transport is None or self._done:
            return
        out, self._out, self._out_len = self._out, [], 0
        data = out[0] if len(out) == 1 else b"".join(out)
        view, step, prefix = memoryview(data), self.max_frame, self.prefix
        parts: list[bytes] = []
        for i in range(0, len(data), step):
            parts += wf.encode(wf.BINARY, view[i:i + step], prefix)
        self.transport.writelines(parts)

    def _send_frame(self, opcode: int, payload: bytes = b"") -> None:
        if self.transport is None or self._done or self._close_sent:
            return
        if opcode == wf.CLOSE:
            self._close_sent = True
        self.transport.writelines(wf.encode(opcode, payload))

    def _send_ping(self, ping_id: int) -> None:
        self._send_frame(wf.PING, ping_id.to_bytes(4, "big"))

    def _quiet(self, seconds: float) -> None:
        if self._paused:
            return  # we stopped reading, not the server; the next ping's deadline counts afresh
        self._fail(TunnelDropped(f"no answer from the server for {seconds:.0f} s (keepalive ping unanswered)"))

    # -- reading flow --------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            if self.transport is not None and not self._done:
                self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self.keepalive.received()  # the silence was ours
            if self.transport is not None and not self._done and self._handler is not None:
                self.transport.resume_reading()

    # -- closing -------------------------------------------------------------------------------

    def close(self, code: int = wf.CLOSE_NORMAL) -> None:
        """Send what is queued, then the close frame; the server's close frame ends it (safe twice)."""
        if self._close_sent or self._done:
            return
        self._flush()
        self._send_frame(wf.CLOSE, wf.close_payload(code))
        self._close_timer = self.loop.call_later(_CLOSE_TIMEOUT, self.abort)
        if self._paused:
            self.resume_reading()  # the server's close frame is behind whatever we did not read

    def abort(self) -> None:
        if self.transport is not None and not self._done:
            self.transport.abort()
        elif self.transport is None:
            self._end(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if isinstance(exc, wf.WebSocketProtocolError):
            self._send_frame(wf.CLOSE, wf.close_payload(wf.CLOSE_PROTOCOL_ERROR))
        self.abort()

    def _end(self, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        self.keepalive.stop()
        for h in (self._flush_handle, self._close_timer):
            if h is not None:
                h.cancel()
        if self._error is not None:
            why: BaseException | None = self._error
        elif self._close_rcvd is not None:
            code, reason = self._close_rcvd
            why = None if code in wf.CLEAN_CLOSE_CODES else TunnelDropped(
                f"closed by the server with code {code}" + (f" ({reason})" if reason else ""))
        elif self._close_sent:
            why = None  # we asked to close; the server need not answer before the TCP close
        else:
            why = TunnelDropped("connection lost" + (f" ({exc})" if exc else ""))
        self._outcome = why
        if not self.closed.done():
            self.closed.set_result(None)
        if self._handler is not None:
            self._handler.ws_closed(why)

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)

    async def __aenter__(self) -> WsConnection:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()


__all__ = ["WsConnection", "WsHandler", "UpgradeRefused"]
