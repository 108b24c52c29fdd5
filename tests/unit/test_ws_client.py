"""tpenv's WebSocket client (tpenv/kits/ws_client.py) against real servers on 127.0.0.1, port 0: the
``websockets`` library as the server (it rejects unmasked client frames, so every echo here also
proves the masking), and a raw TCP server for what a library will not send (a frame split byte by
byte across writes, a 101 with the wrong accept, silence). Through PodTunnel: the port-forward
channel byte and port prefix across fragments."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct

import pytest
from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.http11 import Response

from tpenv.errors import TunnelDropped
from tpenv.kits import ws_frames as wf
from tpenv.kits.portforward import PodTunnel
from tpenv.kits.ws_client import UpgradeRefused, WsConnection

from tests.unit.test_podexec_cut import LocalApi
from tests.unit.test_ws_frames import server_frame

SUB = "v4.channel.k8s.io"
pytestmark = pytest.mark.timeout(60)


class Handler:
    """Collects what the connection hands over; ``pause_after`` bytes pauses reading."""

    def __init__(self, pause_after: int | None = None) -> None:
        self.messages: list[bytearray] = []
        self.total = 0
        self.batch_count = 0
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.got_bytes = asyncio.Event()
        self.pause_after = pause_after
        self.conn: WsConnection | None = None
        self.on_pause = lambda: None

    def ws_piece(self, first, piece):
        if first:
            self.messages.append(bytearray())
        self.messages[-1] += piece
        self.total += len(piece)

    async def wait_for(self, n: int) -> None:
        while self.total < n:
            self.got_bytes.clear()
            await self.got_bytes.wait()

    def ws_batch_end(self):
        self.batch_count += 1
        self.got_bytes.set()
        if self.pause_after is not None and self.total >= self.pause_after:
            self.conn.pause_reading()
            self.on_pause()

    def ws_closed(self, exc):
        self.closed.set_result(exc)

    def ws_pause_writing(self):
        pass

    def ws_resume_writing(self):
        pass


async def open_ws(port: int, handler: Handler | None = None, **kw) -> tuple[WsConnection, Handler]:
    conn = await WsConnection.open(f"ws://127.0.0.1:{port}/x?ports=1", subprotocol=SUB, headers={}, **kw)
    handler = handler or Handler()
    handler.conn = conn
    conn.start(handler)
    return conn, handler


def ws_server(handler, **kw):
    return serve(handler, "127.0.0.1", 0, subprotocols=[SUB], compression=None, max_size=None, **kw)


def port_of(server) -> int:
    return server.sockets[0].getsockname()[1]


async def test_messages_both_ways_masked_large_and_coalesced():
    got = []

    async def echo(ws):
        async for msg in ws:  # websockets closes with 1002 on an unmasked client frame
            got.append(msg)
            await ws.send(msg)

    async with ws_server(echo) as server:
        conn, h = await open_ws(port_of(server), prefix=b"\x00", max_frame=64 * 1024)
        big = os.urandom(200_000)
        conn.write(big)  # > one frame: split into 64 KiB messages, each with the prefix
        for i in range(50):
            conn.write(b"small%02d" % i)  # one loop pass of small writes: one message
        await h.wait_for(len(big) + 4 + 1 + 50 * 7)  # 4 + 1 messages, each with its prefix
        assert all(m[:1] == b"\x00" for m in got)
        assert b"".join(m[1:] for m in got) == big + b"".join(b"small%02d" % i for i in range(50))
        assert [len(m) for m in got] == [65537, 65537, 65537, 3393, 351]
        assert b"".join(bytes(m) for m in h.messages) == b"".join(got)
        conn.close()
        assert await h.closed is None  # our close answered by the server's: clean
        conn.close()  # twice is safe
        await conn.wait_closed()


async def test_server_fragments_pings_and_closes_with_code():
    async def talk(ws):
        await ws.send([b"\x00ab", b"", b"cd", b"ef"])  # one message, four frames
        pong = await ws.ping(b"ping!")
        await pong  # our client answered the ping
        await ws.send(b"\x00after the ping")
        await ws.close(1011, "pod went away")

    async with ws_server(talk) as server:
        conn, h = await open_ws(port_of(server))
        exc = await h.closed
        assert [bytes(m) for m in h.messages] == [b"\x00abcdef", b"\x00after the ping"]
        assert isinstance(exc, TunnelDropped) and "code 1011 (pod went away)" in str(exc)
        await conn.wait_closed()


async def test_clean_server_close_is_no_error_and_async_with_closes():
    async def bye(ws):
        await ws.send(b"\x00x")
        await ws.wait_closed()

    async with ws_server(bye) as server:
        async with await WsConnection.open(f"ws://127.0.0.1:{port_of(server)}/", subprotocol=SUB,
                                           headers={}) as conn:
            h = Handler()
            conn.start(h)
            await h.wait_for(2)
        assert await h.closed is None and bytes(h.messages[0]) == b"\x00x"


async def test_refused_upgrade_carries_status_and_body():
    def refuse(conn, request):
        return Response(403, "Forbidden", Headers({"Content-Type": "application/json"}), b'{"message": "no"}')

    async with ws_server(lambda ws: None, process_request=refuse) as server:
        with pytest.raises(UpgradeRefused) as err:
            await open_ws(port_of(server))
    assert err.value.status == 403 and err.value.body == b'{"message": "no"}'


async def raw_server(script):
    """A TCP server that answers the upgrade by hand (``script(key, reader, writer)``)."""
    async def handle(reader, writer):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        key = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                   if line.lower().startswith("sec-websocket-key"))
        try:
            await script(key, reader, writer)
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def accept_of(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()


def switching(accept: str, sub: str = SUB) -> bytes:
    return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {sub}\r\n\r\n").encode()


async def test_frames_in_the_101s_packet_and_split_byte_by_byte_arrive_whole():
    big = os.urandom(70_000)
    frames = server_frame(wf.BINARY, b"\x00" + big) + server_frame(wf.CLOSE, struct.pack("!H", 1000))

    async def script(key, reader, writer):
        writer.write(switching(accept_of(key)) + frames[:5])  # the first frame starts in the same write
        await writer.drain()
        for i in range(5, 200):  # then byte by byte for a while, then the rest
            writer.write(frames[i:i + 1])
            await writer.drain()
        writer.write(frames[200:])
        await writer.drain()
        await reader.read()  # until the client closes

    server = await raw_server(script)
    async with server:
        conn, h = await open_ws(port_of(server))
        assert await h.closed is None
        assert [bytes(m) for m in h.messages] == [b"\x00" + big]


@pytest.mark.parametrize("answer", [lambda key: switching("bm90IHRoZSBhY2NlcHQ="),
                                    lambda key: switching(accept_of(key), "v5.channel.k8s.io")])
async def test_a_101_that_is_not_our_websocket_is_refused(answer):
    async def script(key, reader, writer):
        writer.write(answer(key))
        await reader.read()

    server = await raw_server(script)
    async with server:
        with pytest.raises(wf.WebSocketProtocolError, match="not the WebSocket asked for"):
            await open_ws(port_of(server))


async def test_unanswered_keepalive_drops_the_connection():
    async def script(key, reader, writer):
        writer.write(switching(accept_of(key)))
        await reader.read()  # reads our pings, never answers

    server = await raw_server(script)
    async with server:
        conn, h = await open_ws(port_of(server), ping_interval=0.05, ping_timeout=0.1)
        exc = await h.closed
    assert isinstance(exc, TunnelDropped) and "keepalive" in str(exc)


async def test_a_paused_reader_holds_one_read_and_tcp_holds_back_the_server():
    total = 32 * 1024 * 1024
    both_stopped = asyncio.Event()  # our client paused reading and the server's writes are paused
    server_paused = [False]
    block = os.urandom(29 * 1024)
    sent = [0]

    def check():
        if server_paused[0] and conn_paused():
            both_stopped.set()

    async def flood(ws):
        pause, resume = ws.pause_writing, ws.resume_writing

        def paused():  # the server's socket buffer is full
            server_paused[0] = True
            pause()
            check()

        def resumed():
            server_paused[0] = False
            resume()

        ws.pause_writing, ws.resume_writing = paused, resumed
        while sent[0] < total:
            await ws.send(block)
            sent[0] += len(block)
        await ws.close()

    h = Handler(pause_after=1024 * 1024)  # after many reads, not at the first
    h.on_pause = check

    def conn_paused() -> bool:
        return h.total >= h.pause_after

    async with ws_server(flood, write_limit=64 * 1024) as server:
        conn, _ = await open_ws(port_of(server), h)
        try:
            await both_stopped.wait()
            held = h.total
            assert 1024 * 1024 <= held < 1024 * 1024 + 256 * 1024  # at most one read past the pause, not 32 MiB
            for _ in range(200):  # loop passes (not time): a client still reading would get more in these
                await asyncio.sleep(0)
            assert h.total == held and sent[0] < total
            h.pause_after = 1 << 62
            conn.resume_reading()
            assert await h.closed is None
            assert h.total == sent[0] >= total
        finally:
            conn.abort()


async def test_http_connect_proxy_carries_the_websocket():
    async def echo(ws):
        async for msg in ws:
            await ws.send(msg)

    seen = []

    async def proxy(reader, writer):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        seen.append(head.split("\r\n")[0])
        host, port = head.split()[1].rsplit(":", 1)
        up_r, up_w = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(r, w):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    async with ws_server(echo) as server:
        target = port_of(server)
        p = await asyncio.start_server(proxy, "127.0.0.1", 0)
        async with p:
            conn, h = await open_ws(port_of(server), proxy=f"http://127.0.0.1:{port_of(p)}")
            conn.write(b"through the proxy")
            await h.wait_for(17)
            assert bytes(h.messages[0]) == b"through the proxy"
            conn.close()
            await conn.wait_closed()
    assert seen == [f"CONNECT 127.0.0.1:{target} HTTP/1.1"]


async def test_port_prefix_split_across_fragments_and_the_error_channel():
    port = struct.pack("<H", 8080)

    async def kubelet(ws):
        # channel 0's first message: the channel byte, then the port in two fragments, then data
        await ws.send([b"\x00", port[:1], port[1:] + b"hello "])
        await ws.send(b"\x01" + port)
        await ws.send([b"\x00wor", b"ld"])
        await ws.send(b"\x01error forwarding port 8080: connection refused")
        await ws.close()

    async with ws_server(kubelet) as server:
        reader, writer = await PodTunnel(LocalApi(port_of(server)), "team", "pod", protocol="websocket").open_stream(8080)
        assert await reader.readexactly(11) == b"hello world"
        with pytest.raises(TunnelDropped, match="error forwarding port 8080: connection refused"):
            await reader.read()
        writer.close()


async def test_a_connection_that_ended_before_start_still_delivers_then_reports_the_end():
    frames = server_frame(wf.BINARY, b"\x01error text") + server_frame(wf.CLOSE, struct.pack("!H", 1000))

    async def script(key, reader, writer):
        writer.write(switching(accept_of(key)) + frames)  # one write: the frames come with the 101
        await reader.read()

    server = await raw_server(script)
    async with server:
        conn = await WsConnection.open(f"ws://127.0.0.1:{port_of(server)}/", subprotocol=SUB, headers={})
        conn.abort()  # the end comes before any handler (over TLS a server's close can, too)
        await conn.wait_closed()
        h = Handler()
        conn.start(h)
        assert [bytes(m) for m in h.messages] == [b"\x01error text"]
        assert h.closed.done() and isinstance(h.closed.result(), TunnelDropped)
