"""The sidecar with no intercept: every byte goes to the app; health endpoints; the CLI.

Stages: start an app and the sidecar (a real process) on 127.0.0.1 port 0s, then call
through the agent port with HTTP/1.1, h2c and raw bytes.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from agent_testkit import REPO, App, H2Caller, Http1, auth_material, get_once, read_response, run_agent
from tpenv_agent.main import LOOP_ENV, SCHED_ENV, choose_loop

pytestmark = pytest.mark.timeout(60)


async def http_get(port: int, path: str) -> int:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    status, _, _ = await read_response(r)
    w.close()
    return status


async def test_passthrough_http1_keepalive_and_bodies_reach_the_app(tmp_path):
    # The raw splice path (--http1-passthrough raw; the default, switch, is the same until an intercept starts).
    async with App("app") as app, run_agent(tmp_path, auth_material(), [f"0:{app.port}:http"],
                                            extra=["--http1-passthrough", "raw"]) as agent:
        async with Http1(agent.port("http")) as c:
            for i in range(5):
                status, _, body = await c.request(f"/r{i}", body=b"x" * 3000, chunked=i % 2 == 1, method="POST")
                assert status == 200 and b'"who": "app"' in body and b'"body_len": 3000' in body
            status, headers, body = await c.request("/big?n=3000000")
            assert status == 200 and len(body) == 3000000
        assert app.connections == 1  # one caller connection, spliced: one app connection


async def test_passthrough_h2c_streams_reach_the_app(tmp_path):
    async with App("app") as app, run_agent(tmp_path, auth_material(), [f"0:{app.port}:grpc"]) as agent:
        async with H2Caller(agent.port("grpc")) as c:
            results = await asyncio.gather(*(c.request(f"/svc/M{i}", grpc=True, body=b"\0" * 10) for i in range(10)))
        assert {r["json"]["who"] for r in results} == {"app"}
        assert all(r["trailers"].get("grpc-status") == "0" for r in results)


async def test_passthrough_raw_bytes_both_directions_with_half_close(tmp_path):
    # An echo server that answers after the caller half-closes: the splice must carry EOF.
    async def echo(reader, writer):
        data = await reader.read()
        writer.write(data[::-1])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, run_agent(tmp_path, auth_material(), [f"0:{port}:raw"]) as agent:
        r, w = await asyncio.open_connection("127.0.0.1", agent.port("raw"))
        payload = bytes(range(256)) * 4096
        w.write(payload)
        w.write_eof()
        got = await r.read()
        assert got == payload[::-1]
        w.close()


async def test_health_livez_and_readyz_answer_200_when_up(tmp_path):
    async with App("app") as app, run_agent(tmp_path, auth_material(), [f"0:{app.port}:http"]) as agent:
        assert await http_get(agent.health, "/livez") == 200
        assert await http_get(agent.health, "/readyz") == 200
        assert await http_get(agent.health, "/other") == 404


def test_cli_without_role_prints_usage_and_unknown_role_fails():
    env = {"PYTHONPATH": "agent"}
    out = subprocess.run([sys.executable, "-m", "tpenv_agent"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "sidecar" in out.stdout
    out = subprocess.run([sys.executable, "-m", "tpenv_agent", "bogus"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "unknown role" in out.stderr


def test_sidecar_without_auth_material_exits_1_with_one_json_error_line(tmp_path):
    env = {"PYTHONPATH": "agent"}
    out = subprocess.run([sys.executable, "-m", "tpenv_agent", "sidecar", "--listen", "0:1:http",
                          "--ssh", "127.0.0.1:0", "--bind-host", "127.0.0.1", "--auth-dir", str(tmp_path / "none"),
                          "--mounts", str(tmp_path)], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 1 and out.stdout == ""
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert lines[-1]["level"] == "error" and "cannot start" in lines[-1]["msg"] and "ca.pub" in lines[-1]["msg"]


def test_loop_choice_prefers_uvloop_and_says_why_when_it_does_not_use_it():
    factory, name, why_not = choose_loop("auto")
    assert name == "uvloop" and why_not is None and factory is not None
    assert choose_loop("uvloop")[1] == "uvloop"
    assert choose_loop("asyncio") == (None, "asyncio", f"{LOOP_ENV}=asyncio")
    factory, name, why_not = choose_loop("trio")
    assert (factory, name) == (None, "asyncio") and "'trio' is not one of auto, uvloop, asyncio" in why_not


async def test_sidecar_runs_on_uvloop_and_falls_back_to_asyncio_with_a_warning_when_it_is_missing(tmp_path):
    m = auth_material()
    # A uvloop that cannot be imported, ahead of the real one on the agent's path.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "uvloop.py").write_text("raise ImportError('no uvloop in this test')\n")
    # The CPU policy's line too (main.cpu_policy, test_cpu_policy.py): batch, or a warning with
    # the reason when it is not what was asked for.
    cases = [({LOOP_ENV: "auto"}, b'"level": "info"', b"event loop: uvloop", "cpu policy: batch", "info"),
             ({LOOP_ENV: "auto", "PYTHONPATH": f"{shadow}:{REPO / 'agent'}", SCHED_ENV: "fifo"}, b'"level": "warning"',
              b"event loop: asyncio (uvloop cannot be imported (ImportError: no uvloop in this test))",
              "cpu policy: normal (TPENV_AGENT_SCHED='fifo' is not one of batch, normal)", "warning")]
    async with App("app") as app:
        for i, (env, level, text, sched, sched_level) in enumerate(cases):
            (tmp_path / str(i)).mkdir()
            async with run_agent(tmp_path / str(i), m, [f"0:{app.port}:http"], env=env) as agent:
                line = await asyncio.wait_for(agent.log_seen(text.decode(), past=True), 10)
                assert level in line, line
                line = await asyncio.wait_for(agent.log_seen(sched, past=True), 10)
                assert f'"level": "{sched_level}"'.encode() in line, line
                # Passthrough works either way: keep-alive requests, then a fresh connection.
                async with Http1(agent.port("http")) as c:
                    for _ in range(3):
                        status, _, body = await c.request("/")
                        assert status == 200 and json.loads(body)["who"] == "app"
                assert (await get_once(agent.port("http")))["who"] == "app"
