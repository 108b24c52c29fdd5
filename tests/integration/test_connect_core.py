"""The outbound core over real SSH and sockets, without a cluster: the agent's relay server
(tpenv_agent.relay, given ranges 127.0.0.0/8) on loopback, a RelaySession dialling it directly,
and an echo server standing for a cluster Service. The API reads the core makes (namespaces,
kube-dns) go to a small stand-in.

Shows: what the core learns from the relay's info op; on_connection and dial carry a
connection through the relay; a dropped relay session is reconnected by the core on its own
(new connections work again, the resolver keeps its address); the resolve-op fallback answers A
records when no cluster DNS is known.
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent" / "tests"))

from agent_testkit import auth_material  # noqa: E402
from tpenv.engine.outbound.core import ConnectOptions, OutboundCore  # noqa: E402
from tpenv.errors import Forbidden  # noqa: E402
from tpenv.kits.relay_client import RelaySession  # noqa: E402
from tpenv_agent import relay as r  # noqa: E402
from tpenv_agent import relay_policy as rp  # noqa: E402
from tpenv_agent import relay_resolve as rr  # noqa: E402
from tpenv_agent.sshd import auth_from_material  # noqa: E402


class Table:
    async def __call__(self, name: str):
        if name.rstrip(".") in ("hello.shop.svc.cluster.local", "hello"):
            return ["127.0.0.1"], None
        raise rr.LookupNotFound(name)


class ApiStandIn:
    """The reads the core makes, answered like a cluster whose user may not read kube-system nor port-forward."""

    def __init__(self) -> None:
        self.core = self

    def read_namespace(self, *a, **kw):  # noqa: D401 - kube.core method shape
        return {}

    def list_namespace(self, *a, **kw):
        return {"items": [{"metadata": {"name": "shop"}}, {"metadata": {"name": "default"}}]}

    def read_namespaced_service(self, *a, **kw):
        raise Forbidden("services \"kube-dns\" is forbidden")

    api = None  # only handed to an ApiGroup for the access review, which `call` answers itself

    async def call(self, fn, *args, what=None, **kw):
        if what is not None and what.resource == "selfsubjectaccessreviews":
            return {"status": {"allowed": False}}  # no pods/portforward: the relay carries everything
        return fn(*args, **kw)

    async def require_namespace(self, ns: str) -> None:
        return None


async def echo_server():
    async def handle(reader, writer):
        data = await reader.read(1024)
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()
    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.fixture
async def world():
    material = auth_material()
    host_key, authorized = auth_from_material(material["ca.pub"], material["host_key"])
    relay = r.Relay(host_key, authorized, rp.StaticPolicy(rp.Policy(rp.parse_cidrs(["127.0.0.0/8"]), explicit=True)),
                    resolver=Table())
    async with relay:
        port = await relay.start("127.0.0.1", 0)
        factory = lambda: RelaySession(material={"ca_key": material["ca_key"], "host_key.pub": material["host_key.pub"]},  # noqa: E731
                                       port=port)
        async with OutboundCore(ApiStandIn(), ConnectOptions(namespace="shop"), relay_factory=factory) as core:
            server = await echo_server()
            async with server:
                yield core, relay, server.sockets[0].getsockname()[1]


async def roundtrip(core, host: str, port: int, data: bytes) -> bytes:
    reader, writer = await core.dial(host, port)
    writer.write(data)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def test_learns_ranges_and_carries_connections(world):
    core, relay, port = world
    # -- stage 1: what the relay said ----------------------------------------------------------
    assert [str(c) for c in core.cidrs] == ["127.0.0.0/8"]
    assert core.rules.cluster_domain == "cluster.local" and core.rules.namespaces == {"shop", "default"}
    assert any("no cluster DNS found" in w for w in core.warnings)

    # -- stage 2: by address (on_connection) and by name (the resolve-op fallback) ---------------
    assert await roundtrip(core, "127.0.0.1", port, b"one") == b"echo:one"
    assert await roundtrip(core, "hello.shop", port, b"two") == b"echo:two"
    host, dport = core.resolver_address
    answer = await dns.asyncquery.udp(dns.message.make_query("hello.shop.", "A"), host, port=dport, timeout=5)
    assert answer.answer[0][0].address == "127.0.0.1"


async def test_a_dropped_relay_session_is_reconnected(world):
    core, relay, port = world
    resolver, before = core.resolver_address, core.relay
    # -- stage 1: the relay drops every connection (a cut port-forward looks the same) -----------
    for c in list(relay.conns):
        c.conn.close()
    await asyncio.wait_for(before.closed.wait(), 10)
    # -- stage 2: the core reconnects by itself; new connections work; the resolver stayed -------
    await asyncio.wait_for(core.live_relay(), 30)
    assert await roundtrip(core, "127.0.0.1", port, b"again") == b"echo:again"
    assert core.reconnects == 1 and core.resolver_address == resolver
