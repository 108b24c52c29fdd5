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


async def test_raw_passthrough_under_load_hands_new_connections_to_per_request_routing_and_back(tmp_path):
    """Callers hammer the port while a header intercept starts and ends: no request fails.

    Connections accepted while the port has no header intercept are raw splices (the fast
    path) and stay with the app for their whole life, intercept or not (``--http1-passthrough
    raw``); connections accepted while it exists are parsed per request, so matching requests
    reach the dev handler; after the leave, new connections are raw again.
    """
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"], extra=["--http1-passthrough", "raw"]) as agent:
        port = agent.port("http")
        phase = "before"
        seen: dict[tuple[str, str, str], int] = {}  # (phase, caller kind, who answered) -> count
        failures: list[str] = []
        stop = asyncio.Event()
        progress = asyncio.Condition()

        def record(kind: str, status: int, body: bytes) -> None:
            if status != 200:
                failures.append(f"{kind}: {status} {body[:100]!r}")
                return
            key = (phase, kind, json.loads(body)["who"])
            seen[key] = seen.get(key, 0) + 1

        async def keepalive() -> None:  # opened before the intercept: spliced raw for good
            async with Http1(port) as c:
                while not stop.is_set():
                    record("keepalive", *(await c.request("/", {"x-dev": "alice"}))[::2])
                    async with progress:
                        progress.notify_all()

        async def fresh() -> None:  # a new connection per request: routed by the rule of the moment
            while not stop.is_set():
                async with Http1(port) as c:
                    record("fresh", *(await c.request("/", {"x-dev": "alice"}))[::2])
                async with progress:
                    progress.notify_all()

        async def run(name: str, workers: list) -> None:
            """Set the phase once the previous one's requests are done, wait until each kind made 30."""
            nonlocal phase
            phase = name
            async with progress:
                await asyncio.wait_for(progress.wait_for(
                    lambda: all(sum(n for (p, k, _), n in seen.items() if p == name and k == kind) >= 30
                                for kind in ("keepalive", "fresh")) or any(w.done() for w in workers)), 20)

        async def guarded(coro) -> None:
            try:
                await coro
            except Exception as e:  # noqa: BLE001 - a failed request is the finding
                failures.append(f"{type(e).__name__}: {e}")

        workers = [asyncio.ensure_future(guarded(f())) for f in (keepalive, keepalive, fresh, fresh)]
        await run("before", workers)
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("web", "http", ALICE, dev.port))["ok"]
            await run("during", workers)
            assert (await s.call("leave", intercept_id="s1:web"))["ok"]
            await run("after", workers)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 20)

    assert failures == []
    # Who answered, by phase and kind. A fresh request racing the switch may still be answered
    # by the previous rule (it connected before), so "during" and "after" allow both for fresh.
    assert {who for (p, k, who) in seen if k == "keepalive"} == {"app"}
    assert {who for (p, k, who) in seen if p == "before"} == {"app"}
    assert seen.get(("during", "fresh", "dev"), 0) >= 25
    assert seen.get(("after", "fresh", "app"), 0) >= 25
