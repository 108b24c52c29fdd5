"""kits/portforward.wait_greeting: a starting pod's port, waited for through real port-forward
WebSockets to a fake kubelet on 127.0.0.1 (the ``websockets`` library as the server, as in
test_ws_client). What the kubelet says while a pod starts: no sandbox yet (the upgrade refused
with ``pod not found``), then nothing listening (``connection refused`` on the error channel),
then the server's first bytes."""
from __future__ import annotations

import asyncio
import struct

import pytest
from websockets.datastructures import Headers
from websockets.http11 import Response

from tpenv.errors import TunnelDropped
from tpenv.kits.pf_common import PortNotListening, pod_side_error
from tpenv.kits.portforward import PodTunnel, wait_greeting

from tests.unit.test_podexec_cut import LocalApi
from tests.unit.test_ws_client import port_of, ws_server

pytestmark = pytest.mark.timeout(60)
PORT = struct.pack("<H", 7922)
REFUSED = b"\x01error forwarding port 7922 to pod abc, uid : failed to execute portforward in network " \
          b"namespace: failed to connect to localhost:7922 inside namespace: connect: connection refused"


class Kubelet:
    """Answers the n-th stream with ``script[n]`` (the last entry repeats): "no-sandbox" refuses
    the upgrade, "refused" writes the kubelet's error, "banner" speaks first, "broken" writes
    another error."""

    def __init__(self, *script: str) -> None:
        self.script = script
        self.streams = 0
        self.closed_by_client = 0

    def process_request(self, conn, request):
        if self._step(peek=True) == "no-sandbox":
            self.streams += 1
            return Response(500, "Internal Server Error", Headers({"Content-Type": "application/json"}),
                            b'{"message": "pod not found (\\"p_ns\\")"}')
        return None

    def _step(self, peek: bool = False) -> str:
        return self.script[min(self.streams, len(self.script) - 1)]

    async def __call__(self, ws) -> None:
        step = self._step()
        self.streams += 1
        await ws.send(b"\x00" + PORT)
        await ws.send(b"\x01" + PORT)
        if step == "refused":
            await ws.send(REFUSED)
        elif step == "broken":
            await ws.send(b"\x01error forwarding port 7922: network namespace for sandbox is closed")
        elif step == "banner":
            await ws.send(b"\x00SSH-2.0-AsyncSSH\r\n")
            try:
                await ws.recv()  # the client closes the probe stream: its end comes here
            except Exception:  # noqa: BLE001 - the close is what we wait for
                self.closed_by_client += 1
            return
        await ws.close()


def tunnel_to(server) -> PodTunnel:
    return PodTunnel(LocalApi(port_of(server)), "ns", "p", protocol="websocket")


def test_the_kubelets_words_for_not_yet_are_port_not_listening():
    assert isinstance(pod_side_error("pf", "dial tcp4 127.0.0.1:7922: connect: connection refused"), PortNotListening)
    assert isinstance(pod_side_error("pf", 'refused (pod not found ("p_ns"))'), PortNotListening)
    other = pod_side_error("pf", "network namespace for sandbox is closed")
    assert type(other) is TunnelDropped and str(other) == "pf: network namespace for sandbox is closed"


async def test_no_sandbox_then_nothing_listening_then_the_banner():
    kubelet = Kubelet("no-sandbox", "no-sandbox", "refused", "refused", "refused", "banner")
    async with ws_server(kubelet, process_request=kubelet.process_request) as server:
        # Stage 1: every "not yet" is tried again; the sixth stream greets.
        await wait_greeting(tunnel_to(server), 7922, timeout=10, every=0.01)
        assert kubelet.streams == 6
        # Stage 2: the probe stream is closed, not left open for the SSH connection to share.
        await asyncio.sleep(0.2)
        assert kubelet.closed_by_client == 1


async def test_another_failure_is_raised_at_once():
    kubelet = Kubelet("refused", "broken", "banner")
    async with ws_server(kubelet, process_request=kubelet.process_request) as server:
        with pytest.raises(TunnelDropped, match="sandbox is closed") as err:
            await wait_greeting(tunnel_to(server), 7922, timeout=10, every=0.01)
        assert not isinstance(err.value, PortNotListening) and kubelet.streams == 2


async def test_a_port_that_never_listens_ends_with_the_timeout_and_backs_off():
    kubelet = Kubelet("refused")
    async with ws_server(kubelet, process_request=kubelet.process_request) as server:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TunnelDropped, match="nothing listens on port 7922 of pod p after 1s"):
            await wait_greeting(tunnel_to(server), 7922, timeout=1.0, every=0.02, steady=0.2, most=0.4)
        assert loop.time() - started < 3
        # Every 20 ms for 0.2 s (about ten), then 40, 80, 160, 320 ms...: far fewer than 1 s / 20 ms.
        assert 5 <= kubelet.streams <= 25, kubelet.streams
