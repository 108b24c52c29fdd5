"""The env report (§5), the SFTP mounts (§6) and the lease (§3) of the sidecar.

Stages: the sidecar with a fake image-env file and app variables in its environment, a
mounts directory with files; then a session asking for env, using SFTP, and a session
that stops pinging.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from agent_testkit import App, RawSession, auth_material, get_once, run_agent

pytestmark = pytest.mark.timeout(60)


async def test_env_report_is_the_app_env_without_the_image_variables(tmp_path):
    m = auth_material()
    (tmp_path / "image-env.json").write_text(json.dumps(["AGENT_ONLY", "PATH", "SHARED"]))
    env = {"APP_DB": "postgres://db", "AGENT_ONLY": "x", "SHARED": "set-by-pod"}
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"], env=env) as agent:
        async with RawSession(agent, m, "s1") as s:
            reported = (await s.call("env"))["env"]
    assert reported["APP_DB"] == "postgres://db"
    assert "AGENT_ONLY" not in reported and "PATH" not in reported and "SHARED" not in reported
    # The variable's value never appears in the agent's logs.
    assert b"postgres://db" not in b"".join(agent.stderr)


async def test_env_report_keeps_image_variables_the_pod_spec_overrode(tmp_path):
    m = auth_material()
    (tmp_path / "image-env.json").write_text(json.dumps({"LANG": "C.UTF-8", "TZ": "UTC"}))
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"],
                                            env={"LANG": "C.UTF-8", "TZ": "Europe/Paris"}) as agent:
        async with RawSession(agent, m, "s1") as s:
            reported = (await s.call("env"))["env"]
    assert "LANG" not in reported and reported["TZ"] == "Europe/Paris"


async def test_sftp_lists_reads_and_writes_the_mounts_chrooted(tmp_path):
    m = auth_material()
    data = tmp_path / "mounts" / "var" / "data"
    data.mkdir(parents=True)
    (data / "hello.txt").write_text("from the pod")
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"],
                                            extra=["--mount", "/var/data"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            mounts = await s.call("mounts")
            assert mounts["mounts"] == ["/var/data"] and mounts["root"] == str(tmp_path / "mounts")
            async with s.conn.start_sftp_client() as sftp:
                assert await sftp.listdir("/var/data") in (["hello.txt"], [".", "..", "hello.txt"])
                async with sftp.open("/var/data/hello.txt") as f:
                    assert await f.read() == "from the pod"
                async with sftp.open("/var/data/new.txt", "w") as f:
                    await f.write("from the laptop")
                # The root: "/" is the mounts root (test_sftp_confined tries the ways out).
                assert await sftp.listdir("/") in (["var"], [".", "..", "var"])
    assert (data / "new.txt").read_text() == "from the laptop"


async def test_intercepts_end_when_pings_stop_for_a_lease(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"], lease=3) as agent:
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("all", "http", None, dev.port))["ok"]
            assert (await get_once(agent.port("http")))["who"] == "dev"
            # This raw session never pings: the agent ends its intercepts and drops it.
            await asyncio.wait_for(s.conn.wait_closed(), 10)
        assert (await get_once(agent.port("http")))["who"] == "app"
        assert any(b"lease expired" in line for line in agent.stderr)


async def test_intercepts_end_when_the_control_channel_closes(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("web", "http", {"headers": {"x-dev": "a"}}, dev.port))["ok"]
            assert (await get_once(agent.port("http"), headers={"x-dev": "a"}))["who"] == "dev"
            # The agent ends the intercepts before it exits the channel, so once we see the
            # channel's end they are gone.
            s.stdin.write_eof()
            assert await s.stdout.read() == b""
            await s.stdin.channel.wait_closed()
            assert (await get_once(agent.port("http"), headers={"x-dev": "a"}))["who"] == "app"


async def test_list_tells_an_abandoned_intercept_from_a_left_one(tmp_path):
    """`list` reports intercepts whose client vanished (doctor fails on those), not ones left."""
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"], lease=3) as agent:
        # Stage 1: an intercept left cleanly leaves nothing behind.
        async with RawSession(agent, m, "s1") as s:
            assert (await s.intercept("web", "http", None, dev.port))["ok"]
            assert (await s.call("leave", intercept_id="s1:web"))["ok"]
        # Stage 2: a client that stops pinging abandons its intercept: remembered, with why.
        async with RawSession(agent, m, "s2") as s:
            assert (await s.intercept("web", "http", None, dev.port))["ok"]
            await asyncio.wait_for(s.conn.wait_closed(), 10)
        async with RawSession(agent, m, "s3") as s:
            answer = await s.call("list")
            assert answer["intercepts"] == []
            assert [(a["intercept_id"], a["ended"]) for a in answer["abandoned"]] == [("s2:web", "lease expired")]
            # Stage 3: the next intercept clears the record (someone uses the agent again).
            assert (await s.intercept("web", "http", None, dev.port))["ok"]
            assert (await s.call("list"))["abandoned"] == []
