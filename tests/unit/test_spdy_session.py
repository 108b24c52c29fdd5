"""The SPDY session and port-forward transport against a fake kubelet on a real local socket.

The fake speaks the same SPDY as the kubelet (frames made with tpenv's own codec, checked
against Go's bytes in test_spdy_frames): 101 on the SPDY upgrade, SYN_REPLY per stream,
pairs streams by requestid, echoes the data stream, writes an error for port 9999. With
``window`` it does SPDY flow control (a small INITIAL_WINDOW_SIZE, WINDOW_UPDATE only once a
whole window arrived) and records what the client had in flight, so the accounting is checked.
"""
from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from tests.tracked_server import TrackedServer
from tpenv.errors import NotFound, TunnelDropped
from tpenv.kits import spdy
from tpenv.kits.portforward import PodTunnel
from tpenv.kits.spdy_frames import (DATA, DEFAULT_WINDOW, GOAWAY, PING, RST_STREAM, SETTINGS,
                                    SETTINGS_INITIAL_WINDOW_SIZE, SYN_REPLY, SYN_STREAM, WINDOW_UPDATE, Frame,
                                    FrameParser, HeaderCompressor, encode, encode_data)

CLOSED_PORT = "9999"
CLOSED_PORT_DATA_FIN_FIRST = "9998"  # the data stream's FIN before the error text (as containerd's forwarder)
SILENT_PORT = "9997"  # the data stream ends, the error stream says nothing and stays open


class FakeKube:
    def __init__(self, host: str) -> None:
        self.host = host
        self.proxy = None

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": "Bearer fake"}

    def ssl_context(self):
        return None

    @property
    def tls_server_name(self):
        return None


class FakeApiServer(TrackedServer):
    """An HTTP server on 127.0.0.1:0: answers WebSocket upgrades with ``ws_answer``, speaks SPDY after a 101."""

    def __init__(self, *, ws_answer: tuple[int, bytes] = (400, b"Upgrade request required"),
                 spdy_answer: tuple[int, bytes] | None = None, window: int | None = None,
                 goaway_after: int | None = None) -> None:
        super().__init__()
        self.ws_answer, self.spdy_answer, self.window, self.goaway_after = ws_answer, spdy_answer, window, goaway_after
        self.ws_attempts = 0
        self.requests: list[str] = []
        self.sessions = 0
        self.syn_streams: list[dict[str, str]] = []
        self.max_in_flight = 0  # per stream, bytes the client sent beyond our last WINDOW_UPDATE
        self.max_session_in_flight = 0
        self.client_updates = 0  # bytes the client gave back with WINDOW_UPDATE (stream level)
        self.client_update_frames = 0  # ... in how many frames
        self.data_frames_sent = 0  # DATA frames with a payload the fake sent (its echo)
        self.pongs: list[int] = []
        self.resets: list[tuple[int, int]] = []
        self.goaways = 0

    async def __aenter__(self) -> "FakeApiServer":
        await super().__aenter__()
        self.kube = FakeKube(f"http://127.0.0.1:{self.port}")
        return self

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        self.requests.append(head.split("\r\n")[0])
        low = head.lower()
        if "upgrade: websocket" in low:
            self.ws_attempts += 1
            await self._answer(writer, *self.ws_answer)
        elif "upgrade: spdy/3.1" in low and "x-stream-protocol-version: portforward.k8s.io" in low:
            assert head.startswith("POST ") and "authorization: bearer fake" in low
            if self.spdy_answer is not None:
                await self._answer(writer, *self.spdy_answer)
                return
            self.sessions += 1
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                         b"X-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n")
            await self._spdy(reader, writer)
        else:
            await self._answer(writer, 400, b"not an upgrade")

    async def _answer(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     f"\r\n".encode() + body)
        await writer.drain()

    async def _spdy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser, comp = FrameParser(), HeaderCompressor()
        streams: dict[int, dict[str, str]] = {}
        pairs: dict[str, dict[str, int]] = {}
        in_flight: dict[int, int] = {}
        session_in_flight = 0
        if self.window is not None:
            writer.write(encode(Frame(SETTINGS, settings={SETTINGS_INITIAL_WINDOW_SIZE: self.window})))
        writer.write(encode(Frame(PING, value=2)))  # the server's pings are even: the client must echo
        while data := await reader.read(65536):
            for f in parser.feed(data):
                if f.kind == SYN_STREAM:
                    streams[f.stream_id] = f.headers
                    self.syn_streams.append(f.headers)
                    writer.write(encode(Frame(SYN_REPLY, f.stream_id, headers={}), comp))
                    pair = pairs.setdefault(f.headers["requestid"], {})
                    pair[f.headers["streamtype"]] = f.stream_id
                    text = (b"error forwarding port %s to pod p, uid : dial tcp4 127.0.0.1:%s: connect: "
                            b"connection refused" % (f.headers["port"].encode(), f.headers["port"].encode()))
                    if len(pair) == 2 and f.headers["port"] == CLOSED_PORT:
                        writer.write(encode_data(pair["error"], text))
                        writer.write(encode_data(pair["error"], fin=True) + encode_data(pair["data"], fin=True))
                    elif len(pair) == 2 and f.headers["port"] == CLOSED_PORT_DATA_FIN_FIRST:
                        writer.write(encode_data(pair["data"], fin=True))
                        await writer.drain()
                        await asyncio.sleep(0.2)  # the client has seen the data FIN alone by now
                        writer.write(encode_data(pair["error"], text) + encode_data(pair["error"], fin=True))
                    elif len(pair) == 2 and f.headers["port"] == SILENT_PORT:
                        writer.write(encode_data(pair["data"], fin=True))
                    if self.goaway_after is not None and len(self.syn_streams) == self.goaway_after:
                        writer.write(encode(Frame(GOAWAY, value=f.stream_id)))
                elif f.kind == DATA and f.stream_id in streams:
                    h = streams[f.stream_id]
                    if h["streamtype"] == "data":
                        n = len(f.data)
                        in_flight[f.stream_id] = in_flight.get(f.stream_id, 0) + n
                        session_in_flight += n
                        self.max_in_flight = max(self.max_in_flight, in_flight[f.stream_id])
                        self.max_session_in_flight = max(self.max_session_in_flight, session_in_flight)
                        if f.data:
                            writer.write(encode_data(f.stream_id, f.data))
                            self.data_frames_sent += 1
                        if self.window is not None and in_flight[f.stream_id] >= self.window:
                            # Only a whole window at a time: the client must really wait for it.
                            writer.write(encode(Frame(WINDOW_UPDATE, f.stream_id, value=in_flight[f.stream_id])))
                            in_flight[f.stream_id] = 0
                        if self.window is not None and session_in_flight >= DEFAULT_WINDOW // 2:
                            writer.write(encode(Frame(WINDOW_UPDATE, 0, value=session_in_flight)))
                            session_in_flight = 0
                    if f.fin and h["streamtype"] == "data":
                        # The echo server closes after EOF: FIN both streams, as the kubelet does.
                        pair = pairs[h["requestid"]]
                        writer.write(encode_data(pair["error"], fin=True) + encode_data(pair["data"], fin=True))
                elif f.kind == WINDOW_UPDATE and f.stream_id:
                    self.client_updates += f.value
                    self.client_update_frames += 1
                elif f.kind == PING:
                    self.pongs.append(f.value)
                    if f.value % 2:
                        writer.write(encode(f))
                elif f.kind == RST_STREAM:
                    self.resets.append((f.stream_id, f.status))
                elif f.kind == GOAWAY:
                    self.goaways += 1
            await writer.drain()


async def echo(tunnel: PodTunnel, payload: bytes, port: int = 9000, *, isolated: bool = False) -> bytes:
    reader, writer = await tunnel.open_stream(port, isolated=isolated)
    writer.write(payload)
    writer.write_eof()
    got = await reader.read()
    writer.close()
    await writer.wait_closed()
    return got


# --- stage 1: streams over one session --------------------------------------------------------------------------------

async def test_many_streams_share_one_session_and_one_upgrade():
    async with FakeApiServer() as fake:
        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="spdy")
        payloads = [os.urandom(100_000 + i) for i in range(8)]
        got = await asyncio.gather(*(echo(tunnel, p) for p in payloads))
        assert got == payloads
        assert fake.sessions == 1 and fake.ws_attempts == 0
        assert fake.requests == ["POST /api/v1/namespaces/ns/pods/pod/portforward HTTP/1.1"]
        # Each TCP stream is an error + a data stream with the same port and requestid, as client-go makes them.
        assert len(fake.syn_streams) == 16
        by_id: dict[str, set[str]] = {}
        for h in fake.syn_streams:
            assert h["port"] == "9000"
            by_id.setdefault(h["requestid"], set()).add(h["streamtype"])
        assert sorted(by_id, key=int) == [str(i) for i in range(8)] and all(v == {"error", "data"}
                                                                             for v in by_id.values())
        tunnel.close()
        await tunnel.wait_closed()


async def test_server_pings_are_answered():
    async with FakeApiServer() as fake:
        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="spdy")
        assert await echo(tunnel, b"x") == b"x"  # the PING came before the first SYN_REPLY
        assert 2 in fake.pongs
        tunnel.close()
        await tunnel.wait_closed()


# The error text before the data stream's FIN (the kubelet's order), and after it: containerd's
# forwarder closes the data stream first; like client-go, the transport reads the error stream
# to its end before calling the data FIN an EOF.
@pytest.mark.parametrize("port", [CLOSED_PORT, CLOSED_PORT_DATA_FIN_FIRST], ids=["error-first", "data-fin-first"])
async def test_error_stream_text_is_the_dropped_reason_and_the_session_lives_on(port):
    async with FakeApiServer() as fake:
        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="spdy")
        reader, _writer = await tunnel.open_stream(int(port))
        with pytest.raises(TunnelDropped, match=f"{port}: connect: connection refused"):
            await asyncio.wait_for(reader.read(), 10)
        # Unlike client-go, one failed stream does not end the session: the next stream uses it.
        assert await echo(tunnel, b"still here") == b"still here"
        assert fake.sessions == 1
        tunnel.close()
        await tunnel.wait_closed()


async def test_a_silent_error_stream_makes_the_data_fin_a_clean_eof_after_a_bounded_wait(monkeypatch):
    monkeypatch.setattr(spdy, "_ERROR_WAIT", 0.3)
    async with FakeApiServer() as fake:
        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="spdy")
        reader, _writer = await tunnel.open_stream(int(SILENT_PORT))
        assert await asyncio.wait_for(reader.read(), 10) == b""  # EOF, not a hang and not an error
        tunnel.close()
        await tunnel.wait_closed()


async def test_refused_spdy_upgrade_maps_like_websocket():
    body = b'{"kind":"Status","message":"pods \\"pod\\" not found","reason":"NotFound","code":404}'
    async with FakeApiServer(spdy_answer=(404, body)) as fake:
        with pytest.raises(NotFound, match='pods "pod" not found'):
            await PodTunnel(fake.kube, "ns", "pod", protocol="spdy").open_stream(80)


async def test_goaway_moves_new_streams_to_a_new_session():
    async with FakeApiServer(goaway_after=2) as fake:
        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="spdy")
        assert await echo(tunnel, b"one") == b"one"  # streams 1 and 3, then GOAWAY(last good 3)
        assert await echo(tunnel, b"two") == b"two"
        assert fake.sessions == 2
        tunnel.close()
        await tunnel.wait_closed()


# --- stage 2: flow control -----------------------------------------------------------------------------------------

async def test_peer_windows_are_never_exceeded_and_updates_are_sent_as_consumed():
    async with FakeApiServer(window=16384) as fake:
        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="spdy")
        payloads = [os.urandom(1024 * 1024) for _ in range(3)]
        got = await asyncio.gather(*(echo(tunnel, p) for p in payloads))
        assert [hashlib.sha256(g).digest() for g in got] == [hashlib.sha256(p).digest() for p in payloads]
        assert fake.max_in_flight <= 16384, fake.max_in_flight
        assert fake.max_session_in_flight <= DEFAULT_WINDOW, fake.max_session_in_flight
        # We gave back (almost) all we consumed: at most half a window per stream stays unacknowledged.
        assert fake.client_updates >= 3 * (1024 * 1024 - DEFAULT_WINDOW // 2)
        tunnel.close()
        await tunnel.wait_closed()


async def test_without_peer_flow_control_windows_are_tracked_not_enforced():
    # The kubelet (spdystream) never sends WINDOW_UPDATE: enforcing 64 KiB would stall at 64 KiB.
    async with FakeApiServer() as fake:
        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="spdy")
        payload = os.urandom(512 * 1024)
        assert await echo(tunnel, payload) == payload
        assert fake.max_in_flight == len(payload)
        tunnel.close()
        await tunnel.wait_closed()


async def test_paused_reading_holds_data_until_resumed():
    async with FakeApiServer() as fake:
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        arrived = asyncio.Event()

        class Recorder(asyncio.Protocol):
            def data_received(self, data):
                got.append(data)
                arrived.set()

        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="spdy")
        transport, _ = await tunnel.create_connection(Recorder, "pod", 9000)
        transport.pause_reading()
        transport.write(b"a" * 1000)
        # The echo reaches the transport's buffer, not the protocol.
        deadline = loop.time() + 10
        while transport._inbuf_len < 1000 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert transport._inbuf_len == 1000 and got == []
        transport.resume_reading()
        await asyncio.wait_for(arrived.wait(), 10)
        assert b"".join(got) == b"a" * 1000
        transport.close()
        tunnel.close()
        await tunnel.wait_closed()


async def test_write_buffer_backpressure_pauses_and_resumes_the_protocol():
    async with FakeApiServer(window=16384) as fake:
        events: list[str] = []
        resumed = asyncio.Event()

        class Writer(asyncio.Protocol):
            def pause_writing(self):
                events.append("pause")

            def resume_writing(self):
                events.append("resume")
                resumed.set()

        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="spdy")
        transport, _ = await tunnel.create_connection(Writer, "pod", 9000)
        transport.write(b"b" * (2 * 1024 * 1024))  # above the 1 MiB high-water mark, the window holds it back
        assert events == ["pause"] and transport.get_write_buffer_size() > 1024 * 1024
        await asyncio.wait_for(resumed.wait(), 20)
        assert events == ["pause", "resume"]
        transport.abort()
        tunnel.close()
        await tunnel.wait_closed()
        assert fake.max_in_flight <= 16384


# --- stage 3: closing ----------------------------------------------------------------------------------------------

async def test_close_is_safe_twice_and_reports_connection_lost_once():
    async with FakeApiServer() as fake:
        lost: list[object] = []

        class P(asyncio.Protocol):
            def connection_lost(self, exc):
                lost.append(exc)

        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="spdy")
        transport, _ = await tunnel.create_connection(P, "pod", 9000)
        transport.close()
        transport.close()
        await asyncio.wait_for(transport.wait_closed(), 5)
        assert lost == [None]
        tunnel.close()
        tunnel.close()
        await tunnel.wait_closed()


async def test_session_loss_drops_every_stream_at_once():
    async with FakeApiServer() as fake:
        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="spdy")
        streams = [await tunnel.open_stream(9000) for _ in range(3)]
        await fake.__aexit__()  # the server side of the session goes away
        for reader, _ in streams:
            with pytest.raises(TunnelDropped, match="connection to the API server"):
                await asyncio.wait_for(reader.read(), 10)
        tunnel.close()
        await tunnel.wait_closed()


async def test_a_reads_frames_reach_the_protocol_at_once_and_window_updates_are_batched():
    # Per 32 KiB frame the client used to call data_received once and send two WINDOW_UPDATEs
    # (each its own write); now a read's frames for a stream go up in one piece and the updates
    # they earn in one write at the read's end.
    async with FakeApiServer() as fake:
        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="spdy")
        calls: list[int] = []
        got = bytearray()
        done = asyncio.get_running_loop().create_future()

        class Counting(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                calls.append(len(data))
                got.extend(data)

            def eof_received(self) -> bool:
                return False

            def connection_lost(self, exc: BaseException | None) -> None:
                if not done.done():
                    done.set_result(exc)

        payload = os.urandom(4 * 1024 * 1024)
        transport, _ = await tunnel.create_connection(Counting, "pod", 9000)
        transport.write(payload)
        transport.write_eof()
        await asyncio.wait_for(done, 20)
        assert bytes(got) == payload
        # Stage: fewer deliveries than frames, fewer update frames than 32 KiB steps, nothing lost.
        assert len(calls) <= 0.75 * fake.data_frames_sent, (len(calls), fake.data_frames_sent)
        assert fake.client_update_frames <= 0.75 * len(payload) / (DEFAULT_WINDOW // 2), fake.client_update_frames
        assert fake.client_updates >= len(payload) - 512 * 1024  # the end of the stream needs none
        tunnel.close()
        await tunnel.wait_closed()
