"""WebSocket first, SPDY when the upgrade is refused: which HTTP answers fall back, which stay errors.

Against a real local HTTP server (port 0) that answers the WebSocket handshake with a chosen
status and speaks SPDY after a 101 (the fake kubelet of test_spdy_session).
"""
from __future__ import annotations

import json
import logging

import pytest

from test_spdy_session import FakeApiServer, echo
from tpenv.errors import Forbidden, NotFound, TunnelDropped, UsageError
from tpenv.kits import portforward
from tpenv.kits.portforward import PodTunnel, WebSocketRefused, configured_protocol, upgrade_refused


def status(code: int, message: str, reason: str) -> bytes:
    return json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                       "reason": reason, "code": code}).encode()


RBAC_403 = status(403, 'pods "pod" is forbidden: User "dev" cannot create resource "pods/portforward" in API group '
                       '"" in the namespace "ns"', "Forbidden")
NEGOTIATION_403 = b"unable to upgrade: unable to negotiate protocol: client supports [v4.channel.k8s.io], " \
                  b"server accepts [portforward.k8s.io]"
NOT_FOUND_404 = status(404, 'pods "pod" not found', "NotFound")


@pytest.fixture(autouse=True)
def forget_choices():
    portforward._refused_websocket.clear()
    yield
    portforward._refused_websocket.clear()


# --- stage 1: the decision, as a table ---------------------------------------------------------------------------

@pytest.mark.parametrize("code,body,falls_back", [
    (400, status(400, "Upgrade request required", "BadRequest").decode(), True),
    (400, "unable to upgrade: missing upgrade headers in request", True),
    (426, "", True),
    (405, "method not allowed", True),
    (501, "websocket not implemented", True),
    (403, NEGOTIATION_403.decode(), True),
    (403, RBAC_403.decode(), False),
    (403, "forbidden", False),
    (401, status(401, "Unauthorized", "Unauthorized").decode(), False),
    (404, NOT_FOUND_404.decode(), False),
    (500, "internal error: upgrade failed", False),
    (503, "", False),
])
def test_upgrade_refused(code, body, falls_back):
    assert upgrade_refused(code, body) is falls_back


def test_the_setting_is_read_and_checked():
    assert configured_protocol({}) == "auto"
    assert configured_protocol({"TPENV_PORTFORWARD_PROTOCOL": "spdy", "TPENV_OTHER": "x"}) == "spdy"
    with pytest.raises(UsageError, match="TPENV_PORTFORWARD_PROTOCOL='h2'"):
        configured_protocol({"TPENV_PORTFORWARD_PROTOCOL": "h2"})


def test_the_environment_picks_the_tunnels_protocol(monkeypatch):
    monkeypatch.setenv("TPENV_PORTFORWARD_PROTOCOL", "websocket")
    assert PodTunnel(object(), "ns", "pod").protocol == "websocket"  # type: ignore[arg-type]
    monkeypatch.delenv("TPENV_PORTFORWARD_PROTOCOL")
    assert PodTunnel(object(), "ns", "pod").protocol == "auto"  # type: ignore[arg-type]


# --- stage 2: against a server that refuses the WebSocket upgrade ------------------------------------------------------

async def test_auto_falls_back_to_spdy_remembers_and_logs_once(caplog):
    caplog.set_level(logging.INFO, logger="tpenv.portforward")
    async with FakeApiServer(ws_answer=(400, status(400, "Upgrade request required", "BadRequest"))) as fake:
        first = PodTunnel(fake.kube, "ns", "pod", protocol="auto")
        assert await echo(first, b"via spdy") == b"via spdy"
        assert await echo(first, b"again") == b"again"
        second = PodTunnel(fake.kube, "ns", "other", protocol="auto")
        assert await echo(second, b"straight to spdy") == b"straight to spdy"
        # One WebSocket attempt for the whole server; the later streams and tunnels go straight to SPDY.
        assert fake.ws_attempts == 1 and fake.sessions == 2
        refusals = [r for r in caplog.records if "refused the WebSocket" in r.getMessage()]
        assert len(refusals) == 1 and refusals[0].levelno == logging.INFO
        assert f"127.0.0.1:{fake.port}" in refusals[0].getMessage() and "HTTP 400" in refusals[0].getMessage()
        for t in (first, second):
            t.close()
            await t.wait_closed()


async def test_negotiation_403_falls_back():
    async with FakeApiServer(ws_answer=(403, NEGOTIATION_403)) as fake:
        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="auto")
        assert await echo(tunnel, b"x") == b"x"
        assert fake.ws_attempts == 1 and fake.sessions == 1
        tunnel.close()
        await tunnel.wait_closed()


@pytest.mark.parametrize("answer,error", [
    ((403, RBAC_403), Forbidden),
    ((404, NOT_FOUND_404), NotFound),
    ((500, b"boom"), TunnelDropped),
])
async def test_errors_do_not_fall_back(answer, error):
    async with FakeApiServer(ws_answer=answer) as fake:
        with pytest.raises(error) as info:
            await PodTunnel(fake.kube, "ns", "pod", protocol="auto").open_stream(80)
        assert not isinstance(info.value, WebSocketRefused)
        assert fake.sessions == 0 and portforward._refused_websocket == {}


async def test_forced_websocket_reports_the_refusal_with_the_way_out():
    async with FakeApiServer() as fake:
        with pytest.raises(WebSocketRefused) as info:
            await PodTunnel(fake.kube, "ns", "pod", protocol="websocket").open_stream(80)
        assert isinstance(info.value, TunnelDropped) and info.value.status == 400
        assert "refused the WebSocket upgrade" in str(info.value) and "SPDY" in (info.value.hint or "")
        assert fake.sessions == 0


async def test_forced_spdy_never_tries_websocket():
    async with FakeApiServer() as fake:
        tunnel = PodTunnel(fake.kube, "ns", "pod", protocol="spdy")
        assert await echo(tunnel, b"x") == b"x"
        assert fake.ws_attempts == 0 and portforward._refused_websocket == {}
        tunnel.close()
        await tunnel.wait_closed()
