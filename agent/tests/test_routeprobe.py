"""Route probes (routeprobe.py, protocol §3.1): the agent's record, and probes through a real
sidecar: recognised by their mark, counted, never handed to the app or an intercept's client."""
from __future__ import annotations

import socket

import pytest

from agent_testkit import App, Clock, RawSession, auth_material, get_once, run_agent
from tpenv_agent.routeprobe import MARK_MSS, SEEN_MAX, ProbeRecord, plain_ip

pytestmark = pytest.mark.timeout(60)


def test_record_keeps_marked_peers_only_while_watching_bounded_and_forgets_on_take():
    clock = Clock()
    rec = ProbeRecord(clock)
    assert not rec.until and not rec.is_probe(MARK_MSS, ("10.0.0.5", 4000))  # no watch: nothing recorded
    rec.watch(2)
    assert rec.is_probe(MARK_MSS - 12, ("::ffff:10.0.0.5", 4001))  # with TCP timestamps; mapped v4
    assert rec.is_probe(MARK_MSS, ("10.0.0.6", 4002))
    assert not rec.is_probe(1448, ("10.0.0.7", 4003))  # an ordinary connection
    assert rec.take() == [("10.0.0.5", 4001), ("10.0.0.6", 4002)]
    assert rec.take() == []
    for i in range(SEEN_MAX + 10):
        rec.is_probe(MARK_MSS, ("10.0.0.8", i))
    assert len(rec.take()) == SEEN_MAX
    # The watch ends by itself: what it saw is forgotten, and nothing more is recorded.
    rec.is_probe(MARK_MSS, ("10.0.0.9", 1))
    clock.now += 2
    assert not rec.watching() and rec.take() == [] and not rec.is_probe(MARK_MSS, ("10.0.0.9", 2))
    rec.watch(1)
    clock.now += 1
    assert rec.until and not rec.catch(None) and not rec.until  # expired: nothing read, the test is off
    rec.watch(1000)
    assert rec.until == clock.now + 300  # a client that vanished cannot leave one open for long
    rec.watch(0)
    assert not rec.until


def test_plain_ip():
    assert plain_ip("::ffff:10.1.2.3") == "10.1.2.3"
    assert plain_ip("fd00::5") == "fd00::5" and plain_ip("10.1.2.3") == "10.1.2.3"


async def test_probes_are_seen_dropped_before_routing_and_ordinary_connections_are_not(tmp_path):
    m = auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        port = agent.port("http")
        async with RawSession(agent, m, "s1") as s:
            assert "route-probe" in (await s.call("hello", session="s1", client="test"))["features"]
            assert (await s.intercept("all", "http", None, dev.port))["ok"]
            # Stage 1: a watch: the dial's probes are seen, each by its local address, and dropped.
            assert (await s.call("probe-watch", seconds=30))["ok"]
            base_app, base_dev = app.connections, dev.connections
            dialed = await s.call("probe-dial", host="127.0.0.1", port=port, count=5, timeout=5)
            probes = dialed["probes"]
            assert len(probes) == 5 and all(p["ok"] for p in probes), dialed
            seen = (await s.call("probe-seen"))["seen"]
            assert sorted(map(tuple, seen)) == sorted(tuple(p["local"]) for p in probes)
            # An ordinary connection during the watch goes where it always goes.
            assert (await get_once(port))["who"] == "dev"
            assert (await s.call("probe-seen"))["seen"] == []
            assert dev.connections == base_dev + 1 and app.connections == base_app
            # Stage 2: a probe to a port nobody listens on fails, with the reason.
            free = socket.socket()
            free.bind(("127.0.0.1", 0))
            closed_port = free.getsockname()[1]
            free.close()
            dialed = await s.call("probe-dial", host="127.0.0.1", port=closed_port, count=1, timeout=5)
            assert not dialed["probes"][0]["ok"] and dialed["probes"][0]["error"], dialed
            # Stage 3: bad requests are refused; without a watch marks are not looked at.
            assert (await s.call("probe-dial", host="127.0.0.1", port=0))["error"]["code"] == "bad-request"
            assert (await s.call("probe-watch", seconds=-1))["error"]["code"] == "bad-request"
            assert (await s.call("probe-watch", seconds=0))["ok"]
            await s.call("probe-dial", host="127.0.0.1", port=port, count=1, timeout=5)
            assert (await s.call("probe-seen"))["seen"] == []
