"""Parked port-forward streams (protocol §4.1, issue 13) between AgentSession and the real sidecar.

On 127.0.0.1 a "port-forward stream" is a plain TCP connection to the agent's stream port (in a
cluster it is one through the API server: tests/e2e/test_intercept_streams.py). Stages: the agent
as a process, a session that parks streams, callers of an all-TCP intercept; then the attacks on
the stream port.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent" / "tests"))
from agent_testkit import App, first_answer, get_once, run_agent  # noqa: E402

from tpenv.kits.agent_client import AgentSession, make_auth_material  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def session(material, agent, sid="s1", **kw) -> AgentSession:
    return AgentSession(sid, ca_key=material["ca_key"], host_key_pub=material["host_key.pub"],
                        port=agent.ssh, **kw)


async def parked(s: AgentSession, n: int) -> None:
    """Until ``n`` streams are parked at the agent (it answered each hello)."""
    while s.streams is None or s.streams.ready < n:
        await asyncio.sleep(0.01)


class Handler:
    """The laptop's handler: greets first, hashes what it is sent, answers a bulk after the caller's EOF."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.got: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "Handler":
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\n")  # before the caller says anything: the agent must hold it until joined
        body = await reader.read()  # to the caller's half-close
        self.got.append(body)
        writer.write(hashlib.sha256(body).digest() + self.answer)
        await writer.drain()
        writer.close()


async def test_all_tcp_connections_ride_parked_streams_intact_with_half_close(tmp_path):
    m = make_auth_material()
    answer = os.urandom(3 * 1024 * 1024 + 7)
    async with App("app") as app, Handler(answer) as dev, run_agent(tmp_path, m, [f"0:{app.port}:tcp"]) as agent:
        async with session(m, agent, streams=3) as s:
            # Stage 1: the agent offers streams; an intercept parks three.
            assert "streams" in s.info["features"] and s.info["streams"]["port"] > 0
            await s.intercept("bulk", "tcp", None, dev.port)
            await asyncio.wait_for(parked(s, 3), 10)

            # Stage 2: a caller greets nothing, sends 5 MiB and half-closes; the handler's greeting,
            # then the hash and the answer come back whole, then EOF: the EOF went both ways
            # out of band, after exactly the bytes before it.
            sent = os.urandom(5 * 1024 * 1024 + 3)
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.port("tcp"))
            assert await asyncio.wait_for(reader.readline(), 10) == b"hello\n"
            writer.write(sent)
            await writer.drain()
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            assert got[:32] == hashlib.sha256(sent).digest() and got[32:] == answer
            assert dev.got == [sent]
            assert s.streams.taken == 1  # it rode a stream, not an SSH channel

            # Stage 3: twelve callers at once, more than are parked: the rest use SSH channels
            # (or streams parked meanwhile); every one is answered whole.
            async def call(i: int) -> bytes:
                r, w = await asyncio.open_connection("127.0.0.1", agent.port("tcp"))
                await r.readline()
                w.write(b"x" * (1000 + i))
                w.write_eof()
                out = await r.read()
                w.close()
                return out

            outs = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(12))), 30)
            for i, out in enumerate(outs):
                assert out == hashlib.sha256(b"x" * (1000 + i)).digest() + answer
            assert 1 < s.streams.taken <= 13
            await asyncio.wait_for(parked(s, 3), 10)  # the pool refills


async def test_a_refused_stream_sends_the_connection_to_the_app_and_http_matches_ride_streams(tmp_path):
    m = make_auth_material()
    async with App("app") as app, App("dev") as dev, \
            run_agent(tmp_path, m, [f"0:{app.port}:http", f"0:{app.port}:tcp"]) as agent:
        async with session(m, agent, streams=2) as s:
            mine = {"x-dev": "me"}
            await s.intercept("web", "http", {"headers": mine}, dev.port)
            await asyncio.wait_for(parked(s, 2), 10)
            # Stage 1: a matching request rides a stream to the handler; others go to the app.
            assert (await get_once(agent.port("http"), headers=mine))["who"] == "dev"
            assert (await get_once(agent.port("http")))["who"] == "app"
            assert s.streams.taken >= 1
            # Stage 2: an intercept whose handler does not listen: the stream is refused ("-") and
            # the connection is answered by the app, as for a refused SSH channel.
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]  # bound, never listening: connecting is refused
            await s.intercept("dead", "tcp", None, dead)
            await asyncio.wait_for(parked(s, 2), 10)
            taken = s.streams.taken
            assert (await get_once(agent.port("tcp")))["who"] == "app"
            assert s.streams.taken == taken + 1
            probe.close()


async def test_the_stream_port_takes_nothing_without_the_sessions_token(tmp_path):
    m = make_auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:tcp"]) as agent:
        async with session(m, agent, streams=1) as s:
            await s.intercept("t", "tcp", None, dev.port)
            await asyncio.wait_for(parked(s, 1), 10)
            port, token = s.info["streams"]["port"], s.info["streams"]["token"]

            # Stage 1: a wrong token, a malformed line, bytes after a right line, no line at all:
            # each is closed with nothing sent, and no caller is handed to them.
            wrong = bytes(a ^ 1 for a in bytes.fromhex(token)).hex()
            assert await first_answer(port, b"TPENV-STREAM 1 " + wrong.encode() + b"\n") == b""
            assert await first_answer(port, b"GET / HTTP/1.1\r\n\r\n") == b""
            assert await first_answer(port, b"TPENV-STREAM 1 " + token.encode() + b"\nextra") == b""
            # Stage 2: callers still reach the handler, on the session's own streams.
            assert (await get_once(agent.port("tcp")))["who"] == "dev"
        # Stage 3: once the session ended, its token parks nothing: the line is refused.
        async with session(m, agent, "s2") as s2:
            assert s2.info["streams"]["token"] != token
            assert await first_answer(port, b"TPENV-STREAM 1 " + token.encode() + b"\n") == b""


async def test_a_handler_that_closes_at_once_ends_each_caller_promptly(tmp_path):
    """The handler's EOF message (0 bytes) can reach the agent before the stream is joined there:
    it must be kept for the join, not dropped (the caller would wait for an EOF forever)."""

    async def closes(reader, writer):
        writer.close()

    server = await asyncio.start_server(closes, "127.0.0.1", 0)
    m = make_auth_material()
    async with server, App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:tcp"]) as agent:
        async with session(m, agent, streams=2) as s:
            await s.intercept("t", "tcp", None, server.sockets[0].getsockname()[1])
            for _ in range(30):
                await asyncio.wait_for(parked(s, 1), 10)
                r, w = await asyncio.open_connection("127.0.0.1", agent.port("tcp"))
                assert await asyncio.wait_for(r.read(), 10) == b""
                w.close()
            assert s.streams.taken >= 10
