"""Intercepts on the sidecar, driven over real SSH by a raw control client.

Stages in each test: an "app" and a "dev" server (the developer's handler), the sidecar as
a real process, a session that registers forwards and intercepts, then callers through the
agent port checking who answered.
"""
from __future__ import annotations

import asyncio

import pytest

from agent_testkit import ALICE, App, H2Caller, Http1, RawSession, auth_material, get_once, run_agent

pytestmark = pytest.mark.timeout(60)


async def test_global_intercept_sends_new_connections_to_the_client_and_leave_restores(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        port = agent.port("http")
        async with RawSession(agent, m, "s1") as s:
            assert (await s.call("hello", session="s1", client="test"))["ports"][0]["name"] == "http"
            # Stage: a keep-alive connection opened before the intercept (spliced raw, then
            # switched at its next request: --http1-passthrough switch, the default) has its
            # next request go to the client too.
            async with Http1(port) as before:
                await before.request("/")
                answer = await s.intercept("all", "http", None, dev.port)
                assert answer["ok"], answer
                assert (await get_once(port))["who"] == "dev"
                _, _, body = await before.request("/")
                assert b'"who": "dev"' in body
                # Stage: leave; new connections, and the next request of that one, go to the app.
                assert (await s.call("leave", intercept_id="s1:all"))["ok"]
                assert (await get_once(port))["who"] == "app"
                _, _, body = await before.request("/")
                assert b'"who": "app"' in body


async def test_http1_keepalive_connection_mixes_matched_and_unmatched_requests(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("web", "http", {"headers": {"X-Dev": "ali.*"}, "path": {"prefix": "/api"}},
                                      dev.port))["ok"]
            async with Http1(agent.port("http")) as c:
                cases = [
                    ({"x-dev": "alice"}, "/api/a", "dev"),
                    ({}, "/api/a", "app"),
                    ({"X-DEV": "alice"}, "/api/b?q=1", "dev"),   # header names are case-insensitive
                    ({"x-dev": "alice"}, "/other", "app"),       # path rule must match too
                    ({"x-dev": "xalice"}, "/api", "app"),        # the regex must match the whole value
                    ({"x-dev": "alicia"}, "/api", "dev"),
                ]
                for headers, path, who in cases * 2:
                    status, _, body = await c.request(path, headers, body=b"b" * 5000, method="POST",
                                                      chunked=path.endswith("b?q=1"))
                    assert status == 200 and f'"who": "{who}"'.encode() in body, (headers, path, body)
                    assert b'"body_len": 5000' in body
                # A big chunked response from the dev side streams through intact.
                status, headers, body = await c.request("/api/big?n=2000000", {"x-dev": "alice"})
                assert headers["x-who"] == "dev" and len(body) == 2000000
            assert app.connections <= 2 and dev.connections <= 2  # pooled upstreams, reused channels


async def test_http1_connection_close_and_upgrade_are_honoured(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("web", "http", ALICE, dev.port))["ok"]
            async with Http1(agent.port("http")) as c:
                status, headers, _ = await c.request("/", {"connection": "close"})
                assert status == 200 and headers.get("connection") == "close"
                assert await c.reader.read() == b""  # the agent closed the caller connection
            async with Http1(agent.port("http")) as c:
                c.writer.write(b"GET /ws HTTP/1.1\r\nhost: x\r\nx-dev: alice\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
                assert (await c.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
                assert await c.reader.readline() == b"dev\n"
                c.writer.write(b"ping over the upgraded connection")
                assert await c.reader.readexactly(33) == b"ping over the upgraded connection"


async def test_h2_and_grpc_streams_split_on_one_connection(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:grpc"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            async with H2Caller(agent.port("grpc")) as c:
                # The caller's connection exists before the intercept (a long-lived gRPC channel).
                assert (await c.request("/svc/Warm", grpc=True))["json"]["who"] == "app"
                assert (await s.intercept("g", "grpc",
                                          {"headers": {"x-telepresence-intercept-id": "s1:g"}, "path": None},
                                          dev.port))["ok"]
                mine = {"x-telepresence-intercept-id": "s1:g"}
                calls = [c.request(f"/svc/M{i}", mine if i % 2 else None, grpc=True, body=b"\0\0\0\0\1x")
                         for i in range(20)]
                calls += [c.request("/plain", mine), c.request("/plain", None),
                          c.request("/big", mine, body=b"y" * 300000)]
                results = await asyncio.gather(*calls)
                for i, r in enumerate(results[:20]):
                    assert r["json"]["who"] == ("dev" if i % 2 else "app")
                    assert r["trailers"] == {"grpc-status": "0", "x-who": r["json"]["who"]}
                assert [r["json"]["who"] for r in results[20:]] == ["dev", "app", "dev"]
                assert results[22]["json"]["body_len"] == 300000
                # Stage: leave; later streams on the same connection go to the app.
                assert (await s.call("leave", intercept_id="s1:g"))["ok"]
                assert (await c.request("/svc/After", mine, grpc=True))["json"]["who"] == "app"


async def test_second_all_tcp_intercept_is_refused_naming_the_holder(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "alice") as a, RawSession(agent, m, "bob") as b:
            assert (await a.intercept("web", "http", None, dev.port))["ok"]
            refused = await b.intercept("web", "http", None, dev.port)
            assert refused["ok"] is False and refused["error"]["code"] == "conflict"
            assert "alice:web" in refused["error"]["message"]
            # Another name of the same session is refused too: one all-TCP holder per port.
            again = await a.intercept("web2", "http", None, dev.port)
            assert again["error"]["code"] == "conflict" and "alice:web" in again["error"]["message"]
            # The same id again replaces (idempotent), it does not conflict with itself.
            assert (await a.intercept("web", "http", None, dev.port))["ok"]
            listed = (await b.call("list"))["intercepts"]
            assert [i["intercept_id"] for i in listed] == ["alice:web"]


async def test_header_intercepts_of_two_sessions_coexist(tmp_path):
    m = auth_material()
    async with App("app") as app, App("alice-dev") as d1, App("bob-dev") as d2, \
            run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "alice") as a, RawSession(agent, m, "bob") as b:
            assert (await a.intercept("web", "http", {"headers": {"x-dev": "alice"}}, d1.port))["ok"]
            assert (await b.intercept("web", "http", {"headers": {"x-dev": "bob"}}, d2.port))["ok"]
            port = agent.port("http")
            assert (await get_once(port, headers={"x-dev": "alice"}))["who"] == "alice-dev"
            assert (await get_once(port, headers={"x-dev": "bob"}))["who"] == "bob-dev"
            assert (await get_once(port))["who"] == "app"
            # Stage: bob's session goes away; his requests go to the app, alice's are unaffected.
        async with RawSession(agent, m, "alice") as a:
            assert (await a.intercept("web", "http", {"headers": {"x-dev": "alice"}}, d1.port))["ok"]
            assert (await get_once(port, headers={"x-dev": "bob"}))["who"] == "app"
            assert (await get_once(port, headers={"x-dev": "alice"}))["who"] == "alice-dev"


async def test_all_tcp_holder_takes_requests_no_header_intercept_matches(tmp_path):
    m = auth_material()
    async with App("app") as app, App("alice-dev") as d1, App("bob-dev") as d2, \
            run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "alice") as a, RawSession(agent, m, "bob") as b:
            assert (await a.intercept("web", "http", {"headers": {"x-dev": "alice"}}, d1.port))["ok"]
            assert (await b.intercept("all", "http", None, d2.port))["ok"]
            port = agent.port("http")
            assert (await get_once(port, headers={"x-dev": "alice"}))["who"] == "alice-dev"
            assert (await get_once(port))["who"] == "bob-dev"


async def test_bad_requests_get_error_answers(tmp_path):
    m = auth_material()
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            no_fwd = await s.call("intercept", intercept_id="s1:x", port="http", match=None,
                                  forward={"host": "tpenv", "port": 99})
            assert no_fwd["error"]["code"] == "bad-request"
            other = await s.intercept("x", "http", {"headers": {"a": "("}}, app.port)
            assert other["error"]["code"] == "bad-request"
            assert (await s.intercept("x", "nope", None, app.port))["error"]["code"] == "not-found"
            foreign = await s.call("intercept", intercept_id="s2:x", port="http", match=None,
                                   forward={"host": "tpenv", "port": 1})
            assert foreign["error"]["code"] == "bad-request"
            assert (await s.call("leave", intercept_id="s1:none"))["error"]["code"] == "not-found"
            assert (await s.call("frobnicate"))["error"]["code"] == "bad-request"
            assert (await s.call("ping"))["ok"]


async def test_http1_methods_beyond_the_common_ones_are_routed_per_request(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("web", "http", ALICE, dev.port))["ok"]
            async with Http1(agent.port("http")) as c:
                _, _, body = await c.request("/dav", {"x-dev": "alice"}, method="PROPFIND")
                assert b'"who": "dev"' in body
                _, _, body = await c.request("/dav", method="PROPFIND")
                assert b'"who": "app"' in body


async def test_http1_route_mode_routes_keepalive_connections_opened_before_the_intercept(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, \
            run_agent(tmp_path, m, [f"0:{app.port}:http"], extra=["--http1-passthrough", "route"]) as agent:
        async with Http1(agent.port("http")) as early, RawSession(agent, m, "s1") as s:
            _, _, body = await early.request("/", ALICE["headers"])
            assert b'"who": "app"' in body
            assert (await s.intercept("web", "http", ALICE, dev.port))["ok"]
            _, _, body = await early.request("/", ALICE["headers"])
            assert b'"who": "dev"' in body
            _, _, body = await early.request("/")
            assert b'"who": "app"' in body


async def test_h2_rst_stream_from_the_handler_reaches_the_caller_and_the_connection_lives_on(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:grpc"]) as agent:
        async with RawSession(agent, m, "s1") as s, H2Caller(agent.port("grpc")) as c:
            assert (await s.intercept("g", "grpc", ALICE, dev.port))["ok"]
            with pytest.raises(ConnectionError, match="reset 8"):
                await c.request("/reset", {"x-dev": "alice"}, grpc=True)
            with pytest.raises(ConnectionError, match="reset 8"):
                await c.request("/reset", None, grpc=True)
            assert (await c.request("/after", {"x-dev": "alice"}, grpc=True))["json"]["who"] == "dev"
            assert (await c.request("/after", None, grpc=True))["json"]["who"] == "app"


async def test_h2_rst_stream_from_the_caller_reaches_the_handler(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:grpc"]) as agent:
        async with RawSession(agent, m, "s1") as s, H2Caller(agent.port("grpc")) as c:
            assert (await s.intercept("g", "grpc", ALICE, dev.port))["ok"]
            sid = c.open_stream("/cancelled", {"x-dev": "alice"})
            await dev.stream_seen.wait()
            c.reset(sid, 8)
            await dev.reset_seen.wait()
            assert dev.resets == [8] and app.resets == []
            assert (await c.request("/after", {"x-dev": "alice"}, grpc=True))["json"]["who"] == "dev"
