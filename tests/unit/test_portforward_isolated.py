"""Isolated connections (an agent's SSH connection, a parked stream): SPDY first, a session each,
WebSocket when the API server refuses SPDY. Against the fake API server of test_spdy_session
(a real local HTTP server on port 0 speaking SPDY after a 101)."""
from __future__ import annotations

import asyncio
import logging

import pytest

from test_spdy_session import FakeApiServer, echo
from tpenv.errors import Forbidden
from tpenv.kits import portforward, spdy
from tpenv.kits.pf_common import WebSocketRefused
from tpenv.kits.portforward import PodTunnel


@pytest.fixture(autouse=True)
def forget_choices():
    portforward._refused_websocket.clear()
    portforward._refused_spdy.clear()
    yield
    portforward._refused_websocket.clear()
    portforward._refused_spdy.clear()


async def test_each_isolated_connection_gets_a_session_that_ends_with_it():
    async with FakeApiServer() as fake:
        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="auto")
        # Stage 1: two isolated connections, two sessions; no WebSocket attempt under auto.
        assert await echo(tunnel, b"one", isolated=True) == b"one"
        assert await echo(tunnel, b"two", isolated=True) == b"two"
        assert fake.sessions == 2 and fake.ws_attempts == 0
        # Stage 2: each session closed once its stream ended (nothing idles for a later stream).
        await asyncio.wait_for(asyncio.gather(*(s.closed.wait() for s in tunnel._sessions)), 5)
        # Stage 3: the tunnel's other streams are as before: WebSocket first under auto (the fake
        # refuses it), then SPDY on the session they share.
        _, writer = await tunnel.open_stream(9000)
        assert fake.ws_attempts == 1 and fake.sessions == 3
        writer.close()
        tunnel.close()
        await tunnel.wait_closed()


async def test_a_server_refusing_spdy_is_remembered_and_isolated_connections_use_websocket(caplog):
    caplog.set_level(logging.INFO, logger="tpenv.portforward")
    async with FakeApiServer(spdy_answer=(400, b"SPDY not supported here")) as fake:
        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="auto")
        # The fake answers WebSocket with 400 as well: the WebSocket attempt is what we look for.
        for _ in range(2):
            with pytest.raises(WebSocketRefused):
                await tunnel.isolated().create_connection(asyncio.Protocol, "ignored", 9000)
        spdy_tries = [r for r in fake.requests if r.startswith("POST ")]
        assert len(spdy_tries) == 1 and fake.ws_attempts == 2  # SPDY once for the server, then WebSocket
        said = [r.getMessage() for r in caplog.records if "refused the SPDY" in r.getMessage()]
        assert len(said) == 1 and "HTTP 400" in said[0]


async def test_forced_protocols_and_a_proxy():
    async with FakeApiServer(spdy_answer=(400, b"no")) as fake:
        # Forced SPDY: the refusal is the error (no quiet WebSocket).
        with pytest.raises(spdy.SpdyRefused):
            await PodTunnel(fake.kube, "ns", "pod", protocol="spdy").isolated().create_connection(
                asyncio.Protocol, "ignored", 9000)
        # Forced WebSocket, or a kubeconfig proxy-url (the SPDY transport has no proxy): no SPDY try.
        before = len(fake.requests)
        with pytest.raises(WebSocketRefused):
            await PodTunnel(fake.kube, "ns", "pod", protocol="websocket").isolated().create_connection(
                asyncio.Protocol, "ignored", 9000)
        fake.kube.proxy = "http://proxy.invalid:3128"
        with pytest.raises(Exception) as info:
            await PodTunnel(fake.kube, "ns", "pod", protocol="auto").isolated().create_connection(
                asyncio.Protocol, "ignored", 9000)
        assert not isinstance(info.value, spdy.SpdyRefused)
        assert not any(r.startswith("POST ") for r in fake.requests[before:])
        assert portforward._refused_spdy == {}


async def test_rbac_refusal_of_spdy_stays_an_error():
    body = b'{"kind":"Status","message":"pods \\"pod\\" is forbidden: User \\"dev\\" cannot create resource"}'
    async with FakeApiServer(spdy_answer=(403, body)) as fake:
        with pytest.raises(Forbidden):
            await PodTunnel(fake.kube, "ns", "pod", protocol="auto").isolated().create_connection(
                asyncio.Protocol, "ignored", 9000)
        assert fake.ws_attempts == 0 and portforward._refused_spdy == {}
