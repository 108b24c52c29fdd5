"""HTTP/2 (h2c, gRPC) per-stream routing on one caller connection, with the h2 library.

The caller's h2c connection is terminated here. Each new stream is routed on the headers
of its HEADERS frame, at that moment, to an upstream h2c connection: one to the app, or one
over a channel to an intercepting client (opened on first use, then shared by later
streams of this caller connection). A ``StreamRelay`` joins the two streams: one queue and
one pump per direction carry headers, DATA, trailers (gRPC status) and RST_STREAM in order.
DATA is acknowledged to its sender only after the other side took it, so h2 flow control
reaches end to end and nothing is buffered beyond one stream window.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from .splice import Buffered, close_writer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM_WINDOW = 1 << 20
CONN_WINDOW = 16 << 20


class H2Conn:
    """One h2 connection over a (Buffered, writer) pair; sends DATA within flow control."""

    def __init__(self, reader: Buffered, writer: Any, *, client_side: bool,
                 on_event: Callable[["H2Conn", Any], None], on_closed: Callable[["H2Conn"], None]) -> None:
        # Headers are checked once, where they come in; what we send on is what came in, so
        # re-validating and re-normalising it outbound is pure cost (it was a third of the
        # agent's CPU per gRPC call).
        cfg = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                        validate_outbound_headers=False, normalize_outbound_headers=False,
                                        normalize_inbound_headers=False)
        self.conn = h2.connection.H2Connection(cfg)
        self.reader, self.writer = reader, writer
        self._on_event, self._on_closed = on_event, on_closed
        self._window = asyncio.Event()
        self._flush_scheduled = False
        self.dead = False

    def start(self) -> None:
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
        self.conn.increment_flow_control_window(CONN_WINDOW - 65535)
        self.flush()

    def flush(self) -> None:
        """Send what h2 has queued, once per loop iteration: the frames of one burst of events
        (HEADERS, DATA, trailers, WINDOW_UPDATEs) leave in one write, so the peer wakes once."""
        if not self._flush_scheduled and not self.dead:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_scheduled = False
        data = self.conn.data_to_send()
        if data and not self.dead:
            self.writer.write(data)

    async def run(self) -> None:
        try:
            while True:
                data = await self.reader.read_some()
                if not data:
                    break
                events = self.conn.receive_data(data)
                for ev in events:
                    if isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                        self._wake()
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        self.flush_now()
                        return
                    else:
                        self._on_event(self, ev)
                self.flush()
        except (OSError, ConnectionError, asyncio.IncompleteReadError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.close()

    def _wake(self) -> None:
        self._window.set()
        self._window = asyncio.Event()

    def close(self) -> None:
        if self.dead:
            return
        self.dead = True
        self._wake()
        close_writer(self.writer)
        self._on_closed(self)

    async def send_data(self, sid: int, data: bytes, end: bool) -> None:
        view = memoryview(data)
        while True:
            if self.dead:
                raise ConnectionError("h2 connection closed")
            size = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size, len(view))
            if size > 0 or not view:
                self.conn.send_data(sid, bytes(view[:size]), end_stream=end and size == len(view))
                view = view[size:]
                if not view:
                    break
                self.flush_now()
            else:
                self.flush_now()
                await self._window.wait()
        self.flush()
        # Back-pressure from the socket/channel; the bytes just queued count on the next call.
        await self.writer.drain()


class _Closed(Exception):
    pass


class StreamRelay:
    """One caller stream joined to one upstream stream."""

    def __init__(self, router: "H2Router", down: H2Conn, down_sid: int) -> None:
        self.router, self.down, self.down_sid = router, down, down_sid
        self.up: H2Conn | None = None
        self.up_sid = 0
        self.to_up: asyncio.Queue = asyncio.Queue()
        self.to_down: asyncio.Queue = asyncio.Queue()
        self.done = 0
        self.aborted = False

    async def run_up(self, headers: list, ended: bool) -> None:
        try:
            self.up = await self.router.upstream_for(headers)
        except Exception:
            self.router.log.info("no upstream for a stream; refusing it")
            self._reset(self.down, self.down_sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            self.router.forget(self)
            return
        if self.aborted:  # the caller reset the stream while we were connecting
            return
        self.up_sid = self.up.conn.get_next_available_stream_id()
        self.router.bind(self)
        try:
            self.up.conn.send_headers(self.up_sid, headers, end_stream=ended)
            self.up.flush()
        except h2.exceptions.H2Error:
            self._reset(self.down, self.down_sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            self.router.forget(self)
            return
        asyncio.ensure_future(self._pump(self.to_down, self.up, lambda: self.up_sid, self.down, lambda: self.down_sid))
        await self._pump(self.to_up, self.down, lambda: self.down_sid, self.up, lambda: self.up_sid, ended)

    async def _pump(self, q: asyncio.Queue, src: H2Conn, src_sid: Callable[[], int],
                    dst: H2Conn, dst_sid: Callable[[], int], ended: bool = False) -> None:
        try:
            while not ended:
                item = await q.get()
                kind = item[0]
                if kind == "stop":  # reset or a dead connection: handled by whoever sent it
                    break
                if kind == "headers":
                    dst.conn.send_headers(dst_sid(), item[1], end_stream=item[2])
                    dst.flush()
                    ended = item[2]
                elif kind == "data":
                    await dst.send_data(dst_sid(), item[1], end=False)
                    try:
                        src.conn.acknowledge_received_data(item[2], src_sid())
                        src.flush()
                    except h2.exceptions.H2Error:
                        pass
                elif kind == "trailers":
                    dst.conn.send_headers(dst_sid(), item[1], end_stream=True)
                    dst.flush()
                    ended = True
                elif kind == "end":
                    dst.conn.end_stream(dst_sid())
                    dst.flush()
                    ended = True
        except (h2.exceptions.H2Error, ConnectionError, OSError):
            self.abort(h2.errors.ErrorCodes.CANCEL)
        finally:
            self.done += 1
            if self.done == 2:
                self.router.forget(self)

    def abort(self, code: int, *, skip: H2Conn | None = None) -> None:
        """RST_STREAM both sides (except ``skip``, the side the reset came from), stop both pumps."""
        self.aborted = True
        for conn, sid in ((self.down, self.down_sid), (self.up, self.up_sid)):
            if conn is not skip:
                self._reset(conn, sid, code)
        self.to_up.put_nowait(("stop",))
        self.to_down.put_nowait(("stop",))
        self.router.forget(self)

    @staticmethod
    def _reset(conn: H2Conn | None, sid: int, code: int) -> None:
        if conn is None or conn.dead or not sid:
            return
        try:
            conn.conn.reset_stream(sid, code)
            conn.flush()
        except h2.exceptions.H2Error:
            pass


class H2Router:
    """Serves one caller h2c connection.

    ``route(headers, path)`` -> a destination key (None: the app); ``open_dest(key)`` ->
    (Buffered, writer) for it, raising when it cannot be reached (the app is used instead).
    """

    def __init__(self, reader: Buffered, writer: Any, route: Callable[[dict, bytes], Any],
                 open_dest: Callable[[Any], Awaitable[tuple[Buffered, Any]]], log: Any) -> None:
        self.route, self.open_dest, self.log = route, open_dest, log
        self.down = H2Conn(reader, writer, client_side=False, on_event=self._down_event, on_closed=self._closed)
        self._ups: dict[Any, asyncio.Future] = {}
        self._by_down: dict[int, StreamRelay] = {}
        self._by_up: dict[tuple[int, int], StreamRelay] = {}
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        self.down.start()
        try:
            await self.down.run()
        finally:
            for fut in self._ups.values():
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    fut.result().close()
                else:
                    fut.cancel()
            for t in list(self._tasks):
                t.cancel()

    # --- streams ------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _down_event(self, conn: H2Conn, ev: Any) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            relay = StreamRelay(self, conn, ev.stream_id)
            self._by_down[ev.stream_id] = relay
            self._spawn(relay.run_up(ev.headers, ev.stream_ended is not None))
            return
        relay = self._by_down.get(getattr(ev, "stream_id", 0) or 0)
        if relay is None:
            return
        if isinstance(ev, h2.events.StreamReset):
            relay.abort(ev.error_code, skip=conn)
        else:
            self._enqueue(relay.to_up, ev)

    def _up_event(self, conn: H2Conn, ev: Any) -> None:
        relay = self._by_up.get((id(conn), getattr(ev, "stream_id", 0) or 0))
        if relay is None:
            return
        if isinstance(ev, (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)):
            relay.to_down.put_nowait(("headers", ev.headers, getattr(ev, "stream_ended", None) is not None))
        elif isinstance(ev, h2.events.StreamReset):
            relay.abort(ev.error_code, skip=conn)
        else:
            self._enqueue(relay.to_down, ev)

    @staticmethod
    def _enqueue(q: asyncio.Queue, ev: Any) -> None:
        if isinstance(ev, h2.events.DataReceived):
            q.put_nowait(("data", ev.data, ev.flow_controlled_length))
        elif isinstance(ev, h2.events.TrailersReceived):
            q.put_nowait(("trailers", ev.headers))
        elif isinstance(ev, h2.events.StreamEnded):
            q.put_nowait(("end",))

    def bind(self, relay: StreamRelay) -> None:
        assert relay.up is not None
        self._by_up[(id(relay.up), relay.up_sid)] = relay

    def forget(self, relay: StreamRelay) -> None:
        self._by_down.pop(relay.down_sid, None)
        if relay.up is not None:
            self._by_up.pop((id(relay.up), relay.up_sid), None)

    # --- upstream connections ------------------------------------------------------------
    async def upstream_for(self, headers: list) -> H2Conn:
        table: dict[bytes, list[bytes]] = {}
        path = b""
        for k, v in headers:
            if k == b":path":
                path = v
            elif not k.startswith(b":"):
                table.setdefault(k.lower(), []).append(v)
        key = self.route(table, path)
        try:
            return await self._upstream(key)
        except Exception:
            if key is None:
                raise
            self.log.info("channel to the client failed; stream goes to the app")
            return await self._upstream(None)

    async def _upstream(self, key: Any) -> H2Conn:
        fut = self._ups.get(key)
        if fut is None or (fut.done() and (fut.cancelled() or fut.exception() or fut.result().dead)):
            fut = asyncio.ensure_future(self._connect(key))
            self._ups[key] = fut
        return await asyncio.shield(fut)

    async def _connect(self, key: Any) -> H2Conn:
        reader, writer = await self.open_dest(key)
        up = H2Conn(reader, writer, client_side=True, on_event=self._up_event, on_closed=self._closed)
        up.start()
        self._spawn(up.run())
        return up

    def _closed(self, conn: H2Conn) -> None:
        """A connection died: every stream relayed through it is reset on the other side."""
        if conn is self.down:
            for relay in list(self._by_down.values()):
                relay.abort(h2.errors.ErrorCodes.CANCEL, skip=conn)
            return
        for (cid, _), relay in list(self._by_up.items()):
            if cid == id(conn):
                relay.abort(h2.errors.ErrorCodes.CANCEL, skip=conn)
