"""In flight at the moment a rule changes: requests finish where they were going, new ones
follow the new rule (contract §3), for HTTP/1.1 and HTTP/2 streams.

Stages: a slow request parks in the dev handler (or the app), the intercept ends (or
starts), a new request goes by the new rule, the parked request is released and answered
by where it was sent.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from agent_testkit import App, H2Caller, Http1, RawSession, auth_material, get_once, run_agent

pytestmark = pytest.mark.timeout(60)

ALICE = {"headers": {"x-dev": "alice"}}


async def test_http1_request_in_flight_to_the_client_finishes_there_after_leave(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("web", "http", ALICE, dev.port))["ok"]
            async with Http1(agent.port("http")) as c:  # parsed: a header intercept exists
                parked = asyncio.ensure_future(c.request("/slow", {"x-dev": "alice"}))
                await dev.arrived.wait()
                assert (await s.call("leave", intercept_id="s1:web"))["ok"]
                assert (await get_once(agent.port("http"), headers={"x-dev": "alice"}))["who"] == "app"
                dev.gate.set()
                status, _, body = await parked
                assert status == 200 and json.loads(body)["who"] == "dev"
                # The same caller connection follows the new rule afterwards.
                _, _, body = await c.request("/", {"x-dev": "alice"})
                assert json.loads(body)["who"] == "app"


async def test_http1_request_in_flight_to_the_app_finishes_there_after_intercept_start(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, App("bob") as bob, \
            run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "alice") as a, RawSession(agent, m, "bob") as b:
            assert (await a.intercept("web", "http", ALICE, dev.port))["ok"]
            async with Http1(agent.port("http")) as c:  # parsed per request
                parked = asyncio.ensure_future(c.request("/slow"))
                await app.arrived.wait()
                assert (await b.intercept("all", "http", None, bob.port))["ok"]
                assert (await get_once(agent.port("http")))["who"] == "bob"
                app.gate.set()
                status, _, body = await parked
                assert status == 200 and json.loads(body)["who"] == "app"
                _, _, body = await c.request("/")
                assert json.loads(body)["who"] == "bob"


async def test_h2_stream_in_flight_to_the_client_finishes_there_after_leave(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:grpc"]) as agent:
        async with RawSession(agent, m, "s1") as s, H2Caller(agent.port("grpc")) as c:
            # h2c is routed per stream even when opened before the intercept.
            assert (await s.intercept("g", "grpc", ALICE, dev.port))["ok"]
            parked = asyncio.ensure_future(c.request("/slow", {"x-dev": "alice"}, grpc=True))
            await dev.arrived.wait()
            assert (await s.call("leave", intercept_id="s1:g"))["ok"]
            assert (await c.request("/now", {"x-dev": "alice"}, grpc=True))["json"]["who"] == "app"
            dev.gate.set()
            done = await parked
            assert done["json"]["who"] == "dev" and done["trailers"]["grpc-status"] == "0"
