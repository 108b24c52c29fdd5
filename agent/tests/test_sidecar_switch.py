"""--http1-passthrough switch (the default): raw splices that move to per-request routing at
the next request once an intercept starts on their port, and only there.

Real sockets: the sidecar process, a scripted app (100 Continue, 101 upgrade to an echo,
gates to hold an answer), the testkit's "dev" handler, a control session over SSH.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from agent_testkit import App, Http1, RawSession, auth_material, read_response, run_agent

pytestmark = pytest.mark.timeout(60)


class ScriptedApp:
    """HTTP/1.1 keep-alive app. ``/continue``: 100 Continue once the gate opens, then reads
    the Content-Length body; ``/upgrade``: 101 once the gate opens, then echoes every byte;
    anything else: 200 at once. Answers are JSON ``{"who": "app", "body": <the body>}``."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.arrived = asyncio.Event()  # a gated request's head was read
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "ScriptedApp":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1]
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if path in (b"/continue", b"/upgrade"):
                    self.arrived.set()
                    await self.gate.wait()
                if path == b"/upgrade":
                    w.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n")
                    while data := await r.read(65536):
                        w.write(data)
                    return
                if path == b"/continue":
                    w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await r.readexactly(length)
                out = json.dumps({"who": "app", "body": body.decode()}).encode()
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(out) + out)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


def who(body: bytes) -> str:
    return json.loads(body)["who"]


async def test_keepalive_connection_switches_at_its_next_request_and_stays_raw_without_intercepts(tmp_path):
    m = auth_material()
    async with ScriptedApp() as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with Http1(agent.port("http")) as idle, Http1(agent.port("http")) as early, \
                RawSession(agent, m, "s1") as s:
            assert who((await early.request("/"))[2]) == "app"
            assert who((await idle.request("/"))[2]) == "app"
            # Stage: an intercept that ends before `idle` speaks again: still the app's.
            assert (await s.intercept("first", "http", None, dev.port))["ok"]
            assert (await s.call("leave", intercept_id="s1:first"))["ok"]
            assert who((await idle.request("/"))[2]) == "app"
            # Stage: the intercept holds the port: both kept-alive connections turn at their
            # next request, and a request read in pieces (the method split) turns too.
            assert (await s.intercept("all", "http", None, dev.port))["ok"]
            assert who((await early.request("/"))[2]) == "dev"
            idle.writer.write(b"GE")
            await idle.writer.drain()  # two sends: the agent may read the method alone
            idle.writer.write(b"T / HTTP/1.1\r\nhost: app\r\n\r\n")
            assert who((await read_response(idle.reader))[2]) == "dev"


async def test_100_continue_body_in_flight_at_the_intercept_start_stays_with_the_app(tmp_path):
    m = auth_material()
    async with ScriptedApp() as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with Http1(agent.port("http")) as c, RawSession(agent, m, "s1") as s:
            # A body that is itself a request line: only the state of the exchange tells them apart.
            body = b"GET /not-a-request HTTP/1.1\r\n\r\n"
            c.writer.write(b"POST /continue HTTP/1.1\r\nhost: app\r\nexpect: 100-continue\r\n"
                           b"content-length: %d\r\n\r\n" % len(body))
            await app.arrived.wait()
            assert (await s.intercept("all", "http", None, dev.port))["ok"]
            app.gate.set()
            assert await c.reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            c.writer.write(body)
            status, _, answer = await read_response(c.reader)
            assert status == 200 and json.loads(answer) == {"who": "app", "body": body.decode()}
            # The exchange is over: the next request is the intercept's.
            assert who((await c.request("/"))[2]) == "dev"


async def test_connection_upgraded_while_armed_is_never_switched(tmp_path):
    m = auth_material()
    async with ScriptedApp() as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with Http1(agent.port("http")) as c, RawSession(agent, m, "s1") as s:
            c.writer.write(b"GET /upgrade HTTP/1.1\r\nhost: app\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n")
            await app.arrived.wait()
            assert (await s.intercept("all", "http", None, dev.port))["ok"]
            app.gate.set()
            assert (await c.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
            # After the 101 the bytes are the echo protocol's, even when they read like a request.
            for _ in range(3):
                line = b"GET / HTTP/1.1\r\nhost: app\r\n\r\n"
                c.writer.write(line)
                assert await c.reader.readexactly(len(line)) == line
