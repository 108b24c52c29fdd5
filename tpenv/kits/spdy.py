"""SPDY/3.1 port-forward: the fallback when the API server refuses the WebSocket upgrade.

kubectl speaks SPDY to ``pods/<name>/portforward`` (client-go ``tools/portforward`` over
apimachinery ``httpstream/spdy`` over moby/spdystream); API servers and proxies that refuse
the WebSocket upgrade still accept it. :mod:`tpenv.kits.portforward` uses what this module
holds: :class:`SpdySession` (one per tunnel, carrying all its streams) and
:func:`open_portforward`, which makes one TCP stream of it an asyncio Transport
(:class:`SpdyPortForwardTransport`). The client is split to be read in parts:

- :mod:`tpenv.kits.spdy_frames`: the framing and header compression (pure);
- :mod:`tpenv.kits.spdy_upgrade`: the HTTP/1.1 upgrade's request, answer and refusals;
- :mod:`tpenv.kits.spdy_session`: the session (reader, writer, flow control, GOAWAY, idle);
- :mod:`tpenv.kits.spdy_stream` and :mod:`tpenv.kits.spdy_keepalive`: a stream, the pings;
- here: port-forward on top.

Port-forward (kubelet ``httpstream.go``): each TCP stream is a pair of SPDY streams with the
headers ``streamtype`` (``error`` / ``data``), ``port`` and ``requestid``. The error stream is
half-closed at once (we never write to it); text arriving on it is the pod side's failure and
becomes :class:`~tpenv.errors.TunnelDropped` with that text. A FIN on the data stream is the
pod side's EOF. A reader that pauses buffers up to ``_STALL_LIMIT``, then the whole session
stops reading its socket (the backpressure left when the peer does no flow control; see
:mod:`tpenv.kits.spdy_session`).
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Callable

from tpenv.errors import TunnelDropped
from tpenv.kits.pf_common import HIGH_WATER, LOW_WATER, PortForwardTransportBase, pod_side_error
from tpenv.kits.spdy_session import SpdySession
from tpenv.kits.spdy_stream import SpdyStream
from tpenv.kits.spdy_upgrade import SpdyRefused

log = logging.getLogger("tpenv.spdy")

_STALL_LIMIT = 1024 * 1024  # bytes buffered for a paused reader before the whole socket stops reading
# After the data stream's FIN, how long to wait for the error stream to end before calling it a
# clean EOF. client-go waits for the error stream without a bound; the kubelet (or the CRI
# runtime's streaming server) may close the data stream *before* it writes its error text.
_ERROR_WAIT = 2.0


class SpdyPortForwardTransport(PortForwardTransportBase):
    """One port-forwarded TCP stream (an error and a data SPDY stream) as an asyncio Transport.

    Events reach the protocol only after its connection_made (frames right behind the SYN_REPLY
    may arrive first: they wait in the buffer), and connection_lost comes from the loop, never
    from inside a call the protocol made (as with asyncio's own transports).
    """

    def __init__(self, session: SpdySession, protocol: asyncio.BaseProtocol, port: int, *,
                 name: str, peer: tuple[str, int],
                 on_lost: Callable[["SpdyPortForwardTransport"], None] | None = None) -> None:
        super().__init__(protocol, name=name, peer=peer, sockname="portforward-spdy", on_lost=on_lost)
        self._session = session
        self._loop = session.loop
        self._made = False
        self._lost_exc: BaseException | None = None
        self._eof_written = False
        self._paused = False
        self._inbuf: collections.deque[bytes] = collections.deque()
        self._inbuf_len = 0
        self._end_pending = False  # the far side ended; report it once the buffer is delivered
        self._end_exc: BaseException | None = None
        self._error_ended = False  # the error stream's FIN or reset came
        self._data_fin_timer: asyncio.TimerHandle | None = None  # a data FIN waiting for the error stream
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

    # -- asyncio.Transport (the state-only methods: PortForwardTransportBase) ------------------

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
        return LOW_WATER, HIGH_WATER

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or self._eof_written or not data:
            return
        self.data_stream.write(bytes(data))
        self._pause_writing_above(len(self.data_stream.outbuf))

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
        self._resume_writing_below(len(stream.outbuf))
        self._lost_if_flushed()

    def _stream_data(self, stream: SpdyStream, data: bytes) -> None:
        if stream is self.error_stream:
            self._error_text += data.decode("utf-8", "replace")
            stream.consumed(len(data))
        elif self._closing or self._lost:
            stream.consumed(len(data))  # like a socket transport: no data_received after close()
        elif self._paused or self._inbuf or not self._made or self._session.hold(self):
            self._inbuf.append(data)
            self._inbuf_len += len(data)
            if self._inbuf_len > _STALL_LIMIT:
                self._session.stall_reading(stream, True)
        else:
            self._protocol.data_received(data)  # type: ignore[attr-defined]
            stream.consumed(len(data))

    def _pass_end(self) -> None:
        """The session's read is over: what it held for us goes to the protocol, in one piece."""
        if self._inbuf and not self._paused and self._made and not self._lost:
            self._deliver()

    def _deliver(self) -> None:
        while self._inbuf and not self._paused and not self._closing and self._made:
            if len(self._inbuf) > 1:  # a read's frames (or what waited for a paused reader) at once
                data = b"".join(self._inbuf)
                self._inbuf.clear()
            else:
                data = self._inbuf.popleft()
            self._inbuf_len -= len(data)
            self._protocol.data_received(data)  # type: ignore[attr-defined]
            self.data_stream.consumed(len(data))
        if self._inbuf_len <= _STALL_LIMIT // 2:
            self._session.stall_reading(self.data_stream, False)
        if not self._inbuf and self._end_pending and not self._paused and self._made:
            self._end_pending = False
            self._end(self._end_exc)

    def _pod_error(self) -> TunnelDropped | None:
        """The pod side's failure (nothing listens, pod gone...) from the error stream's text, if any."""
        text = self._error_text.strip()
        return pod_side_error(f"port-forward {self._name}", text) if text else None

    def _stream_fin(self, stream: SpdyStream) -> None:
        if stream is self.error_stream:
            self._error_ended = True
            if (exc := self._pod_error()) is not None:
                self._end(exc)
            elif self._data_fin_timer is not None:
                self._data_fin_settled()
            return
        # The data stream ended. Like client-go, read the error stream to its end before calling
        # that a clean EOF: its text (if any) says the pod side failed, and may come after this FIN.
        if self._error_ended or self._pod_error() is not None:
            self._end(self._pod_error())
        elif self._data_fin_timer is None:
            self._data_fin_timer = self._loop.call_later(_ERROR_WAIT, self._data_fin_settled)

    def _data_fin_settled(self) -> None:
        """The error stream ended (or stayed silent for _ERROR_WAIT) after the data stream's FIN."""
        if self._data_fin_timer is not None:
            self._data_fin_timer.cancel()
            self._data_fin_timer = None
            self._end(self._pod_error())

    def _stream_reset(self, stream: SpdyStream, why: str) -> None:
        self._pass_end()  # what came before the reset in the same read, as it did frame by frame
        if self._data_fin_timer is not None:
            self._data_fin_timer.cancel()
            self._data_fin_timer = None
        exc = self._pod_error()
        if exc is None and why.startswith("port-forward "):
            exc = TunnelDropped(why)  # the session's own words (lost, closed, protocol error)
        elif exc is None:
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
        if self._data_fin_timer is not None:
            self._data_fin_timer.cancel()
            self._data_fin_timer = None
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


__all__ = ["SpdyRefused", "SpdySession", "SpdyPortForwardTransport", "open_portforward"]
