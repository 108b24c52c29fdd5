"""One agent port: accepts callers and sends each connection, request or stream where the
registry says, at the moment it arrives.

- No intercept on the port: raw splice to the app (``splice.Half``), the hot path. With
  ``--http1-passthrough switch`` (default) an HTTP/1 splice is armed when an intercept starts
  on the port and moves to per-request routing at its next request (``_Entry.arm``).
- Only an all-TCP intercept: raw splice to a channel to its client (app if that fails);
  connections from where the kubelet probes are sniffed as below, so probes reach the app.
- Header intercepts: sniff the first bytes: HTTP/1.x -> per request, h2c preface -> per
  stream, anything else -> the all-TCP holder or the app. A caller silent for ``sniff_timeout``
  gets that destination connected (a server-speaks-first protocol needs its greeting), and
  whoever then speaks first decides: the destination -> raw; the caller, with HTTP -> routed
  as above (``_caller_first``).
"""
from __future__ import annotations

import asyncio
import re
import weakref
from typing import TYPE_CHECKING, Any

from . import log as logs
from .bind import listen_socket
from .http1 import METHOD_SNIFF, Http1Relay, Pool, looks_like_http1
from .http2 import PREFACE, H2Router
from .mirror import MirrorSink
from .registry import Intercept, PortSpec
from .splice import Buffered, Half, close_writer, join, splice_streams

if TYPE_CHECKING:
    from .sidecar import Sidecar

_METHOD_SO_FAR = re.compile(rb"[A-Z][A-Z0-9_-]*")
_REQUEST_LINE = re.compile(rb"[A-Z][A-Z0-9_-]{0,19} [^ \r\n]+ HTTP/1\.[01]\r\n")
_LINE_LIMIT = 8192
# An interim (1xx) status line: the request it answers is not over (100 Continue: its body
# follows) -- or, for 101, the connection is no longer HTTP.
_INTERIM = re.compile(rb"HTTP/1\.[01] 1(\d\d) ")


class _Entry(Half):
    """The caller's side of a connection; decides the route in connection_made.

    On the raw path to the app it still looks at the caller's first bytes (one
    ``startswith``, nothing more): an h2c preface means a long-lived HTTP/2 or gRPC
    connection, which is handed to the per-stream router even with no intercept yet, so an
    intercept started later still sees its streams (``--h2-passthrough route``, default).
    ``--http1-passthrough route`` does the same for HTTP/1.x (off by default: it costs the
    request parsing on every passthrough request); ``switch`` (default) keeps HTTP/1.x raw
    and arms it when an intercept starts (``arm``). Server-speaks-first protocols are not
    delayed: the app is connected before any caller byte is awaited.
    """

    def __init__(self, listener: "PortListener") -> None:
        super().__init__()
        self.listener = listener
        self._sniff: bytearray | None = None
        self.handed_off = False
        # --http1-passthrough switch: ``armed`` while the port has an intercept (both halves
        # then run in Python); ``answered``: the app spoke last (not a 1xx), so the caller's
        # next bytes may start a new request; ``awaiting``: the app's next bytes start its
        # answer (the caller spoke last, or the connection was just armed).
        self.armed = False
        self.answered = True
        self.awaiting = True

    def connection_made(self, transport: Any) -> None:
        lst = self.listener
        probes = lst.sidecar.probes
        if probes.until and probes.catch(transport):
            # A route probe (routeprobe.py): arriving was its whole message; the app and the
            # clients never see it.
            transport.abort()
            return
        header, holder = lst.sidecar.registry.on_port(lst.spec)
        if header or (holder is not None and transport.get_extra_info("peername") in lst.sidecar.kubelet):
            # Requests are looked at: header rules need it, and under an all-TCP intercept the
            # kubelet's probes must reach the app, not the laptop (kubelet.py).
            lst.sniff(transport)
            return
        super().connection_made(transport)  # paused until the other half is up
        sc = lst.sidecar
        if holder is None and (sc.h2_always or sc.h1_always or sc.h1_switch):
            self._sniff = bytearray()
        lst.spawn(lst.splice_to(self, holder))

    def buffer_updated(self, nbytes: int) -> None:
        if self._sniff is None and not self.armed:
            super().buffer_updated(nbytes)
        else:
            self.data_received(bytes(self._view[:nbytes]))

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        if self._sniff is None:
            if not (self.armed and self.answered):
                self.answered, self.awaiting = False, True  # the request (or its body) goes on
                super().data_received(data)
                return
            self._sniff = bytearray()  # the app answered: is this a new request?
        self._sniff += data
        if self.armed:
            self._turn()
            return
        sc = self.listener.sidecar
        h1_wanted = sc.h1_always or sc.h1_switch
        if len(self._sniff) < len(PREFACE) and PREFACE.startswith(self._sniff):
            return  # could still be the preface
        if h1_wanted and len(self._sniff) < METHOD_SNIFF and _METHOD_SO_FAR.fullmatch(self._sniff):
            return  # could still be a request line
        first, self._sniff = bytes(self._sniff), None
        h1 = looks_like_http1(first)
        routed = (sc.h2_always and first.startswith(PREFACE)) or (h1 and sc.h1_always)
        if h1 and sc.h1_switch and not routed:
            header, holder = sc.registry.on_port(self.listener.spec)
            if header or holder is not None:
                routed = True  # an intercept started while the app connection was being made
            else:
                self.listener.raw_h1.add(self)  # armed when an intercept starts (arm())
        if not routed:
            self.answered = False
            Half.data_received(self, first)
            self.shortcut()  # raw from here on (when already joined; else join() does it)
            return
        self._hand_off(first)

    def _turn(self) -> None:
        """Armed, and the caller speaks after the app: a whole request line is a new request,
        which goes to the router; anything else is more of the current exchange. A whole line
        is awaited (bounded), not just a method: a connection upgraded before it was armed
        (101 unseen) carries arbitrary bytes, and a chunk of them may start like "GET "."""
        held = self._sniff
        assert held is not None
        if (len(held) < METHOD_SNIFF and _METHOD_SO_FAR.fullmatch(held)) or (looks_like_http1(held) and b"\r\n" not in held
                                              and len(held) < _LINE_LIMIT):
            return  # could still be a request line
        first, self._sniff = bytes(held), None
        if _REQUEST_LINE.match(first):
            self.listener.raw_h1.discard(self)
            self._hand_off(first)
            return
        self.answered, self.awaiting = False, True
        Half.data_received(self, first)

    def _hand_off(self, first: bytes) -> None:
        # HTTP: drop the raw app connection (nothing was sent on it yet, or, at a turn, it is
        # between requests) and route per request.
        self.handed_off = True  # splice_to must not join a half that is still connecting
        other, self.peer = self.peer, None
        if other is not None:
            other.peer = None
            other.close()
        self.listener.sniff(self.transport, first)

    def can_shortcut(self) -> bool:
        return self._sniff is None and not self.handed_off and not self.armed

    # --- --http1-passthrough switch ------------------------------------------------------
    def arm(self) -> None:
        """An intercept started on the port: leave the C shortcut on both halves, so the
        caller's next request can be seen (``data_received``) and handed to the router."""
        if self.armed or self.handed_off:
            return
        # A kept-alive connection is most often idle between requests; if an answer (or a 1xx)
        # is still to come, app_bytes sees it first.
        self.armed, self.answered, self.awaiting = True, True, True
        for half in (self, self.peer):
            if half is not None and "data_received" in half.__dict__:
                del half.data_received  # back to the class's method
                half.transport.set_protocol(half)  # uvloop re-reads the bound method

    def disarm(self) -> None:
        """No intercept left on the port (or the connection was upgraded): raw again."""
        self.armed = False
        if self._sniff is not None and self.peer is not None and self.peer.transport is not None:
            first, self._sniff = bytes(self._sniff), None  # a held request-line start
            Half.data_received(self, first)
        self.shortcut()
        if self.peer is not None:
            self.peer.shortcut()

    def app_bytes(self, data: bytes) -> None:
        """The app sent ``data`` while armed. Its first bytes after the caller's say whether
        the request is answered: an interim 1xx is not an answer (100 Continue: the body comes
        next); after 101 the connection is no longer HTTP and is never switched."""
        if not self.awaiting or not data:
            return  # more of an answer already seen
        self.awaiting = False
        while True:
            m = _INTERIM.match(data)
            if m is None:
                self.answered = True
                return
            self.answered, self.awaiting = False, True  # the final answer is still to come
            if m.group(1) == b"01":
                self.listener.raw_h1.discard(self)
                self.disarm()
                return
            end = data.find(b"\r\n\r\n")
            if end < 0 or end + 4 == len(data):
                return
            data = data[end + 4:]
            self.awaiting = False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.listener.raw_h1.discard(self)
        super().connection_lost(exc)

    def eof_received(self) -> bool:
        if self._sniff is not None and self._sniff:
            first, self._sniff = bytes(self._sniff), None
            Half.data_received(self, first)
        self._sniff = None
        return super().eof_received()


class _AppHalf(Half):
    """The app's side of a raw splice: tells its caller's ``_Entry`` what the app sent while
    the entry is armed (``--http1-passthrough switch``)."""

    def __init__(self, entry: _Entry) -> None:
        super().__init__()
        self.entry = entry

    def buffer_updated(self, nbytes: int) -> None:
        if self.entry.armed:
            self.data_received(bytes(self._view[:nbytes]))
        else:
            super().buffer_updated(nbytes)

    def data_received(self, data: Any, datatype: Any = None) -> None:
        if self.entry.armed and self.peer is not None:
            self.entry.app_bytes(data)
        super().data_received(data)

    def can_shortcut(self) -> bool:
        return not self.entry.armed


class PortListener:
    def __init__(self, sidecar: "Sidecar", spec: PortSpec, bind_host: str) -> None:
        self.sidecar, self.spec, self.bind_host = sidecar, spec, bind_host
        self.log = logs.unit("listener", spec.name)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self.app_pool = Pool(self.open_app)
        self._icpt_pools: dict[Intercept, Pool] = {}
        self._sinks: dict[Intercept, MirrorSink] = {}
        # Raw-spliced HTTP/1 connections (--http1-passthrough switch), armed by an intercept.
        self.raw_h1: "weakref.WeakSet[_Entry]" = weakref.WeakSet()
        sidecar.registry.on_end.append(self._intercept_ended)
        sidecar.registry.on_add.append(self._intercept_added)

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        # Dual-stack for "any address" (bind.py): injected pods become Ready on IPv6-only clusters.
        self._server = await loop.create_server(lambda: _Entry(self),
                                                sock=listen_socket(self.bind_host, self.spec.agent_port))
        return self._server.sockets[0].getsockname()[1]

    def spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.app_pool.close()
        for p in self._icpt_pools.values():
            p.close()
        for m in self._sinks.values():
            m.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    # --- destinations --------------------------------------------------------------------
    async def open_app(self) -> tuple[Buffered, Any]:
        r, w = await asyncio.open_connection(self.sidecar.app_host, self.spec.app_port)
        return Buffered(r), w

    def _pool_for(self, icpt: Intercept) -> Pool:
        pool = self._icpt_pools.get(icpt)
        if pool is None or pool.closed:
            pool = self._icpt_pools[icpt] = Pool(icpt.opener)  # type: ignore[arg-type]
        return pool

    def _intercept_added(self, icpt: Intercept) -> None:
        if icpt.port is self.spec:
            for entry in list(self.raw_h1):
                entry.arm()

    def _intercept_ended(self, icpt: Intercept) -> None:
        if icpt.port is self.spec and self.sidecar.registry.on_port(self.spec) == ([], None):
            for entry in list(self.raw_h1):
                entry.disarm()
        pool = self._icpt_pools.pop(icpt, None)
        if pool is not None:
            pool.close()  # idle channels only; requests in flight finish on theirs
        sink = self._sinks.pop(icpt, None)
        if sink is not None:
            sink.close()

    # --- connections ---------------------------------------------------------------------
    async def splice_to(self, entry: _Entry, holder: Intercept | None) -> None:
        loop = asyncio.get_running_loop()
        other: Half | None = None
        if holder is not None and not holder.ended:
            try:
                other = await holder.opener.session(Half, entry.transport.get_extra_info("peername") or ("", 0))  # type: ignore[union-attr]
            except Exception as e:
                self.log.info("channel to %s failed (%s); connection goes to the app", holder.intercept_id,
                              type(e).__name__)
        if other is None:
            try:
                _, other = await loop.create_connection(lambda: _AppHalf(entry), self.sidecar.app_host,
                                                        self.spec.app_port)
            except OSError as e:
                self.log.warning("app port %s unreachable: %s", self.spec.app_port, type(e).__name__)
                entry.abort()
                return
        if entry.transport.is_closing() or entry.handed_off:
            other.close()
            return
        join(entry, other)

    def sniff(self, transport: Any, initial: bytes = b"") -> None:
        """Hand the connection to stream-based routing. The protocol switch happens here,
        synchronously, so no byte can reach the old protocol once this returns."""
        loop = asyncio.get_running_loop()
        sr = asyncio.StreamReader(limit=1 << 20)
        proto = asyncio.StreamReaderProtocol(sr)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        transport.resume_reading()
        writer = asyncio.StreamWriter(transport, proto, sr, loop)
        self.spawn(self._route_streams(Buffered(sr, initial), writer))

    async def _route_streams(self, reader: Buffered, writer: Any) -> None:
        up = None  # the raw destination, connected early for a silent caller
        try:
            first = await asyncio.wait_for(self._first_bytes(reader), self.sidecar.sniff_timeout)
        except asyncio.TimeoutError:
            # Nothing within the sniff timeout: a server-speaks-first protocol, or a client that
            # opened its connection ahead of its first request (a pool's spare, a browser's
            # preconnect). Connect the raw destination, so the first kind gets its greeting, and
            # route what the caller says if it speaks first.
            up = await self._raw_destination(writer)
            if up is None:
                close_writer(writer)
                return
            first = await self._caller_first(reader, up)
        except (OSError, ConnectionError):
            close_writer(writer)
            return
        if up is None and not first and reader.eof:
            close_writer(writer)  # closed without a byte (a tcpSocket probe): nothing to deliver
            return
        h2, h1 = first.startswith(PREFACE), looks_like_http1(first)
        if up is not None and (h2 or h1):
            close_writer(up[1])  # it has seen no byte: the caller's requests are routed instead
        if h2:
            await H2Router(reader, writer, self._route_h2, self._open_h2_dest, self.log).run()
        elif h1:
            await Http1Relay(reader, writer, self._route_h1, self.log, self._mirror_h1).run()
        else:
            await self._stream_splice(reader, writer, up)

    @staticmethod
    async def _first_bytes(reader: Buffered) -> bytes:
        """Enough bytes to tell h2c's preface and an HTTP/1 method from anything else."""
        data = await reader.peek(1)
        while data and len(data) < len(PREFACE) and (PREFACE.startswith(data) or b" " not in data[:METHOD_SNIFF]):
            more = await reader.peek(len(data) + 1)
            if len(more) == len(data):
                break
            data = more
        return data

    async def _caller_first(self, reader: Buffered, up: tuple[Buffered, Any]) -> bytes:
        """After a silent start, who speaks first: the caller's first bytes if the caller does
        and the destination has still said nothing; b"" if the destination does (raw from here
        on), or the caller ends or errs first."""
        dest_peek = asyncio.ensure_future(up[0].peek(1))
        caller_peek = asyncio.ensure_future(reader.peek(1))
        try:
            await asyncio.wait((dest_peek, caller_peek), return_when=asyncio.FIRST_COMPLETED)
            if dest_peek.done() or caller_peek.exception() or not caller_peek.result():
                return b""
            # The caller spoke first: enough of it to tell HTTP (bounded like the sniff).
            first = await asyncio.wait_for(self._first_bytes(reader), self.sidecar.sniff_timeout)
        except (asyncio.TimeoutError, OSError, ConnectionError):
            return b""
        finally:
            for t in (dest_peek, caller_peek):
                t.cancel()
            await asyncio.gather(dest_peek, caller_peek, return_exceptions=True)
        return b"" if up[0].buffered() else first

    async def _raw_destination(self, writer: Any) -> tuple[Buffered, Any] | None:
        """A connection to the all-TCP holder's client (the app if that fails), or to the app;
        None when neither can be reached."""
        _, holder = self.sidecar.registry.on_port(self.spec)
        if holder is not None:
            try:
                return await holder.opener(writer.get_extra_info("peername") or ("", 0))  # type: ignore[misc]
            except Exception:
                pass
        try:
            return await self.open_app()
        except OSError:
            return None

    async def _stream_splice(self, reader: Buffered, writer: Any, up: tuple[Buffered, Any] | None = None) -> None:
        up = up or await self._raw_destination(writer)
        if up is None:
            close_writer(writer)
            return
        await splice_streams(reader, writer, up[0], up[1])

    def _route_h1(self, head: Any) -> tuple[Pool, Pool | None]:
        icpt = self.sidecar.registry.route_request(self.spec, head.headers, head.start[1])
        if icpt is None:
            return self.app_pool, None
        return self._pool_for(icpt), self.app_pool

    def _mirror_h1(self, head: Any) -> list[MirrorSink]:
        out = []
        for icpt in self.sidecar.registry.mirrors(self.spec, head.headers, head.start[1]):
            sink = self._sinks.get(icpt)
            if sink is None and not icpt.ended:
                sink = self._sinks[icpt] = MirrorSink(icpt, self.log)
            # A sink whose handler refuses drops the copy here, counted: no Tee, no queue, no channel.
            if sink is not None and not sink.refusing():
                out.append(sink)
        return out

    def _route_h2(self, headers: dict, path: bytes) -> Intercept | None:
        return self.sidecar.registry.route_request(self.spec, headers, path)

    async def _open_h2_dest(self, key: Intercept | None) -> tuple[Buffered, Any]:
        if key is None or key.ended:
            return await self.open_app()
        return await key.opener()  # type: ignore[misc]
