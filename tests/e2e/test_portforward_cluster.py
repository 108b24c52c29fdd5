"""The port-forward transport against the real API server and kubelet.

The echo pod (tpenv-echo on 8080, a raw TCP echo on 9000) is portforward_kit's. Checked: HTTP through many concurrent streams, a large transfer both ways by sha256, the
kubelet's error text when nothing listens, NotFound for a missing pod, and that ``auto`` keeps
WebSocket where the API server accepts it (SPDY is the fallback: test_portforward_spdy.py).
"""
from __future__ import annotations

import asyncio

import pytest

from portforward_kit import echo_pod, http_get, kube, roundtrip  # noqa: F401 - fixtures
from tests.cluster.pytest_plugin import kubectl
from tpenv.errors import NotFound, TunnelDropped
from tpenv.kits.portforward import PodTunnel

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

# -- stage 1: many concurrent HTTP streams to one pod ---------------------------------------------

async def test_many_concurrent_streams_to_a_pod(kube, namespace, echo_pod):
    tunnel = PodTunnel(kube, namespace, echo_pod)
    answers = await asyncio.gather(*(http_get(tunnel, f"/n/{i}") for i in range(40)))
    assert sorted(a["path"] for a in answers) == sorted(f"/n/{i}" for i in range(40))
    assert {a["pod"] for a in answers} == {"echo"}


# -- stage 2: a large transfer, both ways, checked by hash ---------------------------------------

async def test_large_transfer_by_hash(kube, namespace, echo_pod):
    assert await roundtrip(PodTunnel(kube, namespace, echo_pod), 32 * 1024 * 1024)


# -- stage 3: the API server's and kubelet's refusals -------------------------------------------

async def test_closed_port_reports_the_kubelets_error(kube, namespace, echo_pod):
    reader, writer = await PodTunnel(kube, namespace, echo_pod).open_stream(9999)
    with pytest.raises(TunnelDropped) as err:
        await asyncio.wait_for(reader.read(), 30)
    assert "9999" in str(err.value)


async def test_missing_pod_is_not_found(kube, namespace):
    with pytest.raises(NotFound):
        await PodTunnel(kube, namespace, "no-such-pod").open_stream(80)


# -- stage 4: the pod goes away mid-stream: the stream ends at once, not at a timeout -------------

async def test_pod_deleted_mid_stream_ends_the_stream_promptly(kube, namespace, echo_pod):
    reader, writer = await PodTunnel(kube, namespace, echo_pod).open_stream(9000)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    await asyncio.to_thread(kubectl, "delete", "pod", echo_pod, "--grace-period=0", "--force", "--wait=false",
                            ns=namespace)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        rest = await asyncio.wait_for(reader.read(), 30)
        ended = f"EOF after {rest!r}"
    except TunnelDropped as e:
        ended = str(e)
    took = loop.time() - t0
    print(f"stream ended {took:.2f}s after the pod's deletion: {ended}")
    assert took < 15, ended


# -- stage 5: auto keeps WebSocket where the API server accepts it (SPDY is only the fallback) --------

async def test_auto_uses_websocket_when_accepted(kube, namespace, echo_pod):
    from tpenv.kits import portforward
    from tpenv.kits.portforward import PortForwardTransport

    tunnel = PodTunnel(kube, namespace, echo_pod, protocol="auto")
    transport, _ = await tunnel.create_connection(asyncio.Protocol, echo_pod, 9000)
    assert isinstance(transport, PortForwardTransport) and not tunnel.uses_spdy
    assert (kube.host, None) not in portforward._refused_websocket and tunnel._sessions == set()
    transport.close()
    await transport.wait_closed()
