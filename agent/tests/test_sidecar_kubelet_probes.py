"""The kubelet's probes of an intercepted port reach the app, never the developer's handler
(kubelet.py), also while the pod starts with an intercept already registered. A real sidecar
process; the "kubelet" is a caller bound to 127.0.0.2 that has probed the agent's health port,
another caller (127.0.0.3) is anyone else in the cluster."""
from __future__ import annotations

import asyncio
import json

import pytest

from agent_testkit import App, H2Caller, RawSession, auth_material, read_response, run_agent

pytestmark = pytest.mark.timeout(60)

KUBELET, OTHER = "127.0.0.2", "127.0.0.3"
PROBE_UA = "kube-probe/1.34"


async def request(port: int, source: str, path: str = "/", ua: str | None = None) -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        head = f"GET {path} HTTP/1.1\r\nhost: app\r\n" + (f"user-agent: {ua}\r\n" if ua else "") + "\r\n"
        writer.write(head.encode())
        status, _, body = await read_response(reader)
        return status, (json.loads(body) if body.startswith(b"{") else {})
    finally:
        writer.close()


async def health_probe(port: int, source: str, ua: str) -> int:
    status, _ = await request(port, source, "/readyz", ua)
    return status


async def test_all_tcp_intercept_leaves_the_kubelets_probes_to_the_app(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, \
            run_agent(tmp_path, m, [f"0:{app.port}:http"], probed=False) as agent:
        port = agent.port("http")
        async with RawSession(agent, m, "s1") as s:
            # Stage 1: an intercept registered before the kubelet has probed the agent (a client
            # connecting while the pod starts): nothing tells the kubelet's address apart yet,
            # so the app gets every connection, a probe or not, and every request on it.
            assert (await s.intercept("all", "http", None, dev.port))["ok"]
            assert (await request(port, KUBELET, "/ready", PROBE_UA))[1]["who"] == "app"
            assert (await request(port, OTHER, "/", "curl/8"))[1]["who"] == "app"
            # Stage 2: the kubelet probes the agent's health port (as it does every few seconds);
            # a caller that only claims the agent proves nothing about its address.
            assert await health_probe(agent.health, OTHER, "curl/8") == 200
            assert (await request(port, OTHER, "/", "curl/8"))[1]["who"] == "app"
            assert await health_probe(agent.health, KUBELET, PROBE_UA) == 200
            # Stage 3: from the kubelet's address, its probes go to the app; anything else it
            # sends still goes to the laptop (a hostNetwork caller on the node, say).
            for path in ("/ready", "/live", "/"):
                assert (await request(port, KUBELET, path, PROBE_UA))[1]["who"] == "app"
            assert (await request(port, KUBELET, "/", "curl/8"))[1]["who"] == "dev"
            # Stage 4: a gRPC (h2c) probe carries the same user agent, per stream.
            async with H2Caller(port, KUBELET) as h2:
                probe = await h2.request("/grpc.health.v1.Health/Check", {"user-agent": PROBE_UA}, grpc=True)
                other = await h2.request("/grpc.health.v1.Health/Check", {"user-agent": "grpc-go/1.7"}, grpc=True)
                assert (probe["json"]["who"], other["json"]["who"]) == ("app", "dev")
            # Stage 5: a tcpSocket probe (connect, close) reaches neither side.
            before = app.connections, dev.connections
            for _ in range(5):
                _, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(KUBELET, 0))
                w.close()
                await w.wait_closed()
            await asyncio.sleep(0.3)
            assert (app.connections, dev.connections) == before
            # Stage 6: from anyone else a probe header changes nothing: raw, to the laptop, not
            # looked at (no wait for a server-speaks-first protocol).
            assert (await request(port, OTHER, "/ready", PROBE_UA))[1]["who"] == "dev"


async def test_header_rules_never_take_the_kubelets_probes(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        port = agent.port("http")
        async with RawSession(agent, m, "s1") as s:
            # A path-only rule matching every request: it would have taken /ready as well.
            assert (await s.intercept("web", "http", {"headers": {}, "path": {"prefix": "/"}}, dev.port))["ok"]
            assert (await request(port, OTHER, "/ready"))[1]["who"] == "dev"
            assert (await request(port, OTHER, "/ready", PROBE_UA))[1]["who"] == "app"
            # h2 (a gRPC probe): the stream with the kubelet's user agent goes to the app.
            async with H2Caller(port) as h2:
                probe = await h2.request("/grpc.health.v1.Health/Check", {"user-agent": PROBE_UA}, grpc=True)
                other = await h2.request("/grpc.health.v1.Health/Check", grpc=True)
                assert (probe["json"]["who"], other["json"]["who"]) == ("app", "dev")
