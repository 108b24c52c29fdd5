"""Zero failed requests in a steady passthrough stream while intercepts start, stop, and
their client processes are frozen (lease expiry) or SIGKILLed (connection lost).

Stages:
1. an app, a developer's handler, the sidecar; a steady stream of unmatched requests on
   fresh HTTP/1.1 connections, long-lived keep-alive ones, and a long-lived h2c (gRPC-like)
   connection, each counting failures;
2. an in-process session starts and leaves a header intercept;
3. a client *process* intercepts; it is SIGSTOPped: no pings, the lease ends its intercept;
4. another client process intercepts and is SIGKILLed: its intercept ends with the
   connection;
5. the stream stops: every request succeeded, and matched requests went to the developer
   only while an intercept held them.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent" / "tests"))
from agent_testkit import App, H2Caller, Http1, get_once, run_agent  # noqa: E402

from tpenv.kits.agent_client import AgentSession, make_auth_material  # noqa: E402

pytestmark = pytest.mark.timeout(90)

HEADER = "x-telepresence-intercept-id"

CLIENT = r"""
import asyncio, sys
from tpenv.kits.agent_client import AgentSession
async def main(ssh, dev, auth_dir, sid):
    ca_key = open(auth_dir + "/ca_key", "rb").read()
    host_pub = open(auth_dir + "/host_key.pub", "rb").read()
    async with AgentSession(sid, ca_key=ca_key, host_key_pub=host_pub, port=int(ssh)) as s:
        await s.intercept("web", "http", {"headers": {"%s": sid + ":web"}}, int(dev))
        print("intercepting", flush=True)
        await s.closed.wait()
asyncio.run(main(*sys.argv[1:]))
""" % HEADER


class Stream:
    """Unmatched requests back to back on several kinds of connection; counts outcomes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failed: list[str] = []
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(f()) for f in (self.fresh, self.keepalive, self.keepalive_renewed, self.h2)]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    def record(self, who: str | None, what: str) -> None:
        if who == "app":
            self.ok += 1
        else:
            self.failed.append(f"{what}: {who}")

    async def fresh(self) -> None:
        while not self.stop.is_set():
            try:
                self.record((await get_once(self.port, "/fresh"))["who"], "fresh")
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                self.failed.append(f"fresh: {e!r}")

    async def keepalive(self) -> None:
        async with Http1(self.port) as c:  # opened before any intercept: stays one connection
            while not self.stop.is_set():
                try:
                    status, _, body = await c.request("/ka", body=b"p" * 2000, method="POST")
                    self.record("app" if status == 200 and b'"who": "app"' in body else body.decode(), "keepalive")
                except Exception as e:  # noqa: BLE001
                    self.failed.append(f"keepalive: {e!r}")
                    return

    async def keepalive_renewed(self) -> None:
        while not self.stop.is_set():
            async with Http1(self.port) as c:  # new connections land in whatever mode is current
                for _ in range(10):
                    try:
                        status, _, body = await c.request("/ka2")
                        self.record("app" if status == 200 and b'"who": "app"' in body else body.decode(), "renewed")
                    except Exception as e:  # noqa: BLE001
                        self.failed.append(f"renewed: {e!r}")
                        break

    async def h2(self) -> None:
        async with H2Caller(self.port) as c:
            while not self.stop.is_set():
                try:
                    r = await c.request("/pkg.Svc/Call", grpc=True, body=b"\0\0\0\0\0")
                    self.record(r["json"]["who"] if r["trailers"].get("grpc-status") == "0" else "bad", "h2")
                except Exception as e:  # noqa: BLE001
                    self.failed.append(f"h2: {e!r}")
                    return


async def client_process(agent, dev: App, auth_dir: Path, sid: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(agent.ssh), str(dev.port), str(auth_dir), sid,
        stdout=asyncio.subprocess.PIPE)
    assert await proc.stdout.readline() == b"intercepting\n"
    return proc


async def test_steady_stream_has_zero_failures_across_intercept_start_stop_freeze_and_sigkill(tmp_path):
    m = make_auth_material()
    client_auth = tmp_path / "client-auth"
    client_auth.mkdir()
    (client_auth / "ca_key").write_bytes(m["ca_key"])
    (client_auth / "host_key.pub").write_bytes(m["host_key.pub"])
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"], lease=3) as agent:
        port = agent.port("http")
        # Stage 1: the stream runs.
        stream = Stream(port)
        stream.start()
        # Stage 2: an in-process session starts and leaves an intercept.
        async with AgentSession("inproc", ca_key=m["ca_key"], host_key_pub=m["host_key.pub"], port=agent.ssh) as s:
            await s.intercept("web", "http", {"headers": {HEADER: "inproc:web"}}, dev.port)
            assert (await get_once(port, headers={HEADER: "inproc:web"}))["who"] == "dev"
            await s.leave("web")
            assert (await get_once(port, headers={HEADER: "inproc:web"}))["who"] == "app"
        # Stage 3: a client process, frozen: its pings stop and the lease ends the intercept.
        frozen = await client_process(agent, dev, client_auth, "frozen")
        assert (await get_once(port, headers={HEADER: "frozen:web"}))["who"] == "dev"
        expired = agent.log_seen("lease expired")
        os.kill(frozen.pid, signal.SIGSTOP)
        await asyncio.wait_for(expired, 20)
        assert (await get_once(port, headers={HEADER: "frozen:web"}))["who"] == "app"
        frozen.kill()
        await frozen.wait()
        # Stage 4: a client process SIGKILLed: the connection drops and the intercept with it.
        killed = await client_process(agent, dev, client_auth, "killed")
        assert (await get_once(port, headers={HEADER: "killed:web"}))["who"] == "dev"
        gone = agent.log_seen("session killed disconnected")
        killed.send_signal(signal.SIGKILL)
        await killed.wait()
        await asyncio.wait_for(gone, 20)
        assert (await get_once(port, headers={HEADER: "killed:web"}))["who"] == "app"
        # Stage 5: the verdict.
        await stream.finish()
    assert stream.failed == [], stream.failed[:5]
    assert stream.ok > 50
