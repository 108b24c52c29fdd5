"""HTTP/1.1 corner cases of the per-request router (a header intercept makes the port parse).

Stages: app, dev handler, sidecar, a session with a header intercept; then raw bytes on
one caller connection.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from agent_testkit import App, RawSession, auth_material, read_response, run_agent

pytestmark = pytest.mark.timeout(60)

ALICE = {"headers": {"x-dev": "alice"}}


async def test_pipelined_requests_are_answered_in_order_by_their_own_destinations(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("web", "http", ALICE, dev.port))["ok"]
            r, w = await asyncio.open_connection("127.0.0.1", agent.port("http"))
            w.write(b"GET /1 HTTP/1.1\r\nhost: a\r\nx-dev: alice\r\n\r\n"
                    b"POST /2 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc"
                    b"GET /3 HTTP/1.1\r\nhost: a\r\nx-dev: alice\r\n\r\n")
            answers = [json.loads((await read_response(r))[2]) for _ in range(3)]
            assert [(a["path"], a["who"]) for a in answers] == [("/1", "dev"), ("/2", "app"), ("/3", "dev")]
            assert answers[1]["body_len"] == 3
            w.close()


async def test_expect_100_continue_is_relayed_before_the_body(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("web", "http", ALICE, dev.port))["ok"]
            r, w = await asyncio.open_connection("127.0.0.1", agent.port("http"))
            # The test app never sends 100 itself, so the body must flow without waiting for it.
            w.write(b"PUT /up HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n")
            await w.drain()
            w.write(b"hello")
            status, _, body = await read_response(r)
            assert status == 200 and json.loads(body)["body_len"] == 5
            w.close()


async def test_unreachable_app_gets_502_and_bad_request_gets_400(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev:
        dead_port = app.port
    async with App("dev") as dev, run_agent(tmp_path, m, [f"0:{dead_port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("web", "http", ALICE, dev.port))["ok"]
            r, w = await asyncio.open_connection("127.0.0.1", agent.port("http"))
            w.write(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            assert (await read_response(r))[0] == 502
            w.close()
            r, w = await asyncio.open_connection("127.0.0.1", agent.port("http"))
            w.write(b"GET / HTTP/1.1\r\nbroken header line\r\n\r\n")
            assert (await read_response(r))[0] == 400
            w.close()


async def test_non_http_bytes_on_a_parsing_port_are_spliced_to_the_app(tmp_path):
    m = auth_material()

    async def upper(reader, writer):
        while data := await reader.read(65536):
            writer.write(data.upper())
        writer.close()

    server = await asyncio.start_server(upper, "127.0.0.1", 0)
    async with server, App("dev") as dev, \
            run_agent(tmp_path, m, [f"0:{server.sockets[0].getsockname()[1]}:tcp"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("web", "tcp", ALICE, dev.port))["ok"]
            r, w = await asyncio.open_connection("127.0.0.1", agent.port("tcp"))
            w.write(b"\x16\x03\x01 not http at all")
            assert await r.readexactly(19) == b"\x16\x03\x01 NOT HTTP AT ALL"
            w.close()


async def test_request_head_is_forwarded_before_a_body_that_waits_for_100_continue(tmp_path):
    m = auth_material()

    async def continuing(reader, writer):
        # Answers 100 Continue only once the head has arrived; the body follows only then.
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await reader.readexactly(5)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n" + body.upper())
        await writer.drain()

    server = await asyncio.start_server(continuing, "127.0.0.1", 0)
    async with server, App("dev") as dev, \
            run_agent(tmp_path, m, [f"0:{server.sockets[0].getsockname()[1]}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("web", "http", ALICE, dev.port))["ok"]
            r, w = await asyncio.open_connection("127.0.0.1", agent.port("http"))
            w.write(b"PUT /up HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n")
            assert await r.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            w.write(b"hello")
            status, _, body = await read_response(r)
            assert status == 200 and body == b"HELLO"
            w.close()
