"""Mirror intercepts on the sidecar (issue #11): the app answers every request, the client gets a
copy of each matched one, and a client that is slow or gone never holds the app's answers."""
from __future__ import annotations

import asyncio

import pytest

from agent_testkit import App, Http1, RawSession, auth_material, run_agent

pytestmark = pytest.mark.timeout(90)

ALICE = {"headers": {"x-dev": "alice"}, "path": None}


async def mirror_stats(s: RawSession, iid: str) -> dict:
    [icpt] = [i for i in (await asyncio.wait_for(s.call("list"), 20))["intercepts"] if i["intercept_id"] == iid]
    return icpt


async def test_mirror_copies_matched_requests_and_the_app_answers_all(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            # Stage 1: a mirror with a header rule; hello says the agent can mirror.
            assert "mirror" in (await s.call("hello", session="s1", client="test"))["features"]
            assert (await s.intercept("copy", "http", ALICE, dev.port, mode="mirror"))["ok"]

            # Stage 2: matched and unmatched requests (bodies, chunked too) all answered by the app.
            async with Http1(agent.port("http")) as c:
                for i in range(10):
                    headers = {"x-dev": "alice"} if i % 2 == 0 else {}
                    status, _, body = await c.request(f"/r{i}", headers, body=b"x" * 3000, method="POST",
                                                      chunked=i % 4 == 0)
                    assert status == 200 and b'"who": "app"' in body and b'"body_len": 3000' in body

            # Stage 3: the laptop got exactly the five matched ones, bodies intact; nothing dropped.
            icpt = await mirror_stats(s, "s1:copy")
            assert icpt["mode"] == "mirror"
            # Copies go out after the answers; the counters say when they have arrived.
            for _ in range(200):
                if (await mirror_stats(s, "s1:copy"))["mirror"]["sent"] == 5:
                    break
                await asyncio.sleep(0.05)
            assert (await mirror_stats(s, "s1:copy"))["mirror"] == {"sent": 5, "dropped": 0}
            assert dev.requests == 5 and app.requests == 10

            # Stage 4: a mirror never holds the port: an all-TCP intercept still may, and takes it.
            assert (await s.intercept("all", "http", None, dev.port))["ok"]
            await s.call("leave", intercept_id="s1:all")


async def test_a_stopped_laptop_never_slows_the_app_and_drops_are_counted(tmp_path):
    m = auth_material()
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        # The laptop handler has stopped: nothing listens on its port.
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        gone_port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        async with RawSession(agent, m, "s1") as s:
            assert (await asyncio.wait_for(s.intercept("gone", "http", None, gone_port, mode="mirror"), 20))["ok"]
            # The app answers every request; each copy fails at once and is dropped, counted.
            async with Http1(agent.port("http")) as c:
                for i in range(50):
                    status, _, body = await asyncio.wait_for(c.request(f"/g{i}"), 10)
                    assert status == 200 and b'"who": "app"' in body
            for _ in range(200):  # the counter is the only sign the workers are done
                gone = (await mirror_stats(s, "s1:gone"))["mirror"]
                if gone["dropped"] == 50:
                    break
                await asyncio.sleep(0.05)
            assert gone == {"sent": 0, "dropped": 50}


async def test_bad_mode_is_refused(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            answer = await s.intercept("x", "http", None, dev.port, mode="wiretap")
            assert not answer["ok"] and answer["error"]["code"] == "bad-request"
            assert "mode" in answer["error"]["message"]
