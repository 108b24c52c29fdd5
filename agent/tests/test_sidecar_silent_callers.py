"""Callers that say nothing at first, on a port with a header intercept (listener._route_streams, _caller_first).

The agent waits ``--sniff-timeout`` (0.5 s in these tests) for a caller's first bytes to tell
HTTP from anything else. A server-speaks-first protocol never sends first, so after the wait
its server is connected and greets. An HTTP client can be silent too: a pool's spare
connection, a browser's preconnect. Its requests must still meet the header rules.
"""
from __future__ import annotations

import asyncio

import pytest

from agent_testkit import ALICE, App, H2Caller, Http1, RawSession, auth_material, run_agent

pytestmark = pytest.mark.timeout(60)

SILENCE = 1.0  # past the tests' --sniff-timeout of 0.5 s


async def test_an_http_caller_silent_past_the_sniff_timeout_is_still_routed_by_header(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("web", "http", ALICE, dev.port))["ok"]
            # Stage 1: a connection opened ahead of its first request, silent past the timeout.
            async with Http1(agent.port("http")) as c:
                await asyncio.sleep(SILENCE)
                # Stage 2: its requests meet the header rule, matched and not, on one connection.
                for headers, who in (({"x-dev": "alice"}, "dev"), ({}, "app"), ({"x-dev": "alice"}, "dev")):
                    status, _, body = await c.request("/", headers)
                    assert status == 200 and f'"who": "{who}"'.encode() in body, (headers, body)
            # Stage 3: an h2c caller silent as long is routed per stream too.
            async with H2Caller(agent.port("http"), silence=SILENCE) as h2:
                assert (await h2.request("/a", {"x-dev": "alice"}))["json"]["who"] == "dev"
                assert (await h2.request("/b"))["json"]["who"] == "app"


async def test_a_server_speaks_first_protocol_still_gets_its_greeting_and_a_raw_splice(tmp_path):
    # Stage 1: an app that greets on connect, then echoes lines (SMTP, MySQL, SSH do the like).
    async def greeter(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 hello\r\n")
        while line := await r.readline():
            w.write(b"echo " + line)
        w.close()

    server = await asyncio.start_server(greeter, "127.0.0.1", 0)
    app_port = server.sockets[0].getsockname()[1]
    m = auth_material()
    try:
        async with App("dev") as dev, run_agent(tmp_path, m, [f"0:{app_port}:smtp"]) as agent:
            async with RawSession(agent, m, "s1") as s:
                assert (await s.intercept("web", "smtp", ALICE, dev.port))["ok"]
                # Stage 2: the caller waits for the greeting, as such clients do.
                reader, writer = await asyncio.open_connection("127.0.0.1", agent.port("smtp"))
                assert await asyncio.wait_for(reader.readline(), 10) == b"220 hello\r\n"
                # Stage 3: even a line that looks like an HTTP request goes to the app raw now.
                for line in (b"EHLO me\r\n", b"GET / HTTP/1.1\r\n"):
                    writer.write(line)
                    assert await asyncio.wait_for(reader.readline(), 10) == b"echo " + line
                writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_with_an_all_tcp_holder_too_a_silent_http_caller_meets_the_header_rules(tmp_path):
    # Stage 1: alice's header intercept and bob's all-TCP intercept on one port.
    m = auth_material()
    async with App("app") as app, App("alice-dev") as d1, App("bob-dev") as d2, \
            run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "alice") as a, RawSession(agent, m, "bob") as b:
            assert (await a.intercept("web", "http", ALICE, d1.port))["ok"]
            assert (await b.intercept("all", "http", None, d2.port))["ok"]
            # Stage 2: a silent caller gets bob's handler connected (it might greet); it does not,
            # and the caller's requests are then routed: alice's header to her, the rest to bob.
            async with Http1(agent.port("http")) as c:
                await asyncio.sleep(SILENCE)
                for headers, who in (({"x-dev": "alice"}, "alice-dev"), ({}, "bob-dev")):
                    status, _, body = await c.request("/", headers)
                    assert status == 200 and f'"who": "{who}"'.encode() in body, (headers, body)
            assert app.connections == 0
