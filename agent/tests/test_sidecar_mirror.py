"""Mirror intercepts on the sidecar (issue #11): the app answers every request, the client gets a
copy of each matched one, and a client that is slow or gone never holds the app's answers."""
from __future__ import annotations

import asyncio

import pytest

from agent_testkit import ALICE, App, Http1, RawSession, auth_material, run_agent

pytestmark = pytest.mark.timeout(90)


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


class Toggle:
    """The laptop's handler as a switch: refusing (accepts, closes without an answer, as a
    stopped handler behind a live tunnel does) or answering 200. Counts the copies that reach it."""

    def __init__(self) -> None:
        self.answering = False
        self.connections = 0
        self.paths: list[bytes] = []

    async def __aenter__(self) -> "Toggle":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.answering:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
                self.paths.append(head.split(b" ")[1])
        finally:
            writer.close()


async def test_a_refusing_handler_trips_the_breaker_and_a_probe_reopens_it(tmp_path):
    from tpenv_agent.mirror import COOLDOWN, TRIP_AFTER, WORKERS

    m = auth_material()
    async with App("app") as app, Toggle() as laptop, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            assert (await asyncio.wait_for(s.intercept("cut", "http", None, laptop.port, mode="mirror"), 20))["ok"]

            # Stage 1: 100 requests while the handler refuses; the app answers all of them.
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with Http1(agent.port("http")) as c:
                for i in range(100):
                    status, _, body = await asyncio.wait_for(c.request(f"/c{i}"), 10)
                    assert status == 200 and b'"who": "app"' in body
            for _ in range(200):
                cut = (await mirror_stats(s, "s1:cut"))["mirror"]
                if cut["dropped"] == 100:
                    break
                await asyncio.sleep(0.05)
            elapsed = loop.time() - started
            assert cut == {"sent": 0, "dropped": 100}

            # Stage 2: the breaker tripped after TRIP_AFTER refusals: only those, the copies already
            # in flight then, and one probe per cooldown reached the handler (without it: 100).
            probes = int(elapsed / COOLDOWN) + 1
            assert laptop.connections <= TRIP_AFTER + WORKERS + probes, (laptop.connections, elapsed)
            tripped = [line for line in agent.stderr if b"copies in a row" in line]
            assert len(tripped) == 1, tripped  # one log line, not one per copy

            # Stage 3: the handler answers again; within a cooldown a probe finds it and copying resumes.
            laptop.answering = True
            async with Http1(agent.port("http")) as c:
                for i in range(int(60 / 0.2)):
                    status, _, _ = await asyncio.wait_for(c.request(f"/back{i}"), 10)
                    assert status == 200
                    if (await mirror_stats(s, "s1:cut"))["mirror"]["sent"] >= 1:
                        break
                    await asyncio.sleep(0.2)
                assert (await mirror_stats(s, "s1:cut"))["mirror"]["sent"] >= 1, "no probe reached the handler in 60 s"
                # Closed again: every copy from now on reaches the handler.
                for i in range(10):
                    assert (await asyncio.wait_for(c.request(f"/again{i}"), 10))[0] == 200
            again = [f"/again{i}".encode() for i in range(10)]
            for _ in range(200):
                if all(p in laptop.paths for p in again):
                    break
                await asyncio.sleep(0.05)
            assert sorted(p for p in laptop.paths if p.startswith(b"/again")) == again  # 4 workers: any order
            assert (await mirror_stats(s, "s1:cut"))["mirror"]["sent"] == len(laptop.paths)
            await asyncio.wait_for(agent.log_seen("answers again", past=True), 20)
