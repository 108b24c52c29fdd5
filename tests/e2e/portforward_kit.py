"""What the port-forward e2e tests share: the echo pod, a Kube for the test's kubeconfig, and
the two checks they make through a tunnel (an HTTP GET, a transfer both ways by sha256).

The pod runs tpenv-echo on 8080 and a raw TCP echo on 9000 (python3 is in the testapp image).
``test_portforward_cluster`` uses them over WebSocket, ``test_portforward_spdy`` over SPDY.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pytest

from tests.cluster.pytest_plugin import apply, kubectl
from tests.kit.apps import testapp_image
from tpenv.kits.kube import Kube
from tpenv.kits.portforward import PodTunnel

TCP_ECHO = """
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000)); s.listen(64)
def serve(c):
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


@pytest.fixture
def echo_pod(namespace):
    apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "echo", "labels": {"app": "echo"}},
           "spec": {"containers": [
               {"name": "http", "image": testapp_image(), "imagePullPolicy": "Never", "command": ["tpenv-echo"],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}},
               {"name": "tcp", "image": testapp_image(), "imagePullPolicy": "Never",
                "command": ["python3", "-c", TCP_ECHO],
                "readinessProbe": {"tcpSocket": {"port": 9000}, "periodSeconds": 1}}]}}, ns=namespace)
    kubectl("wait", "--for=condition=Ready", "pod/echo", "--timeout=120s", ns=namespace, timeout=150)
    return "echo"


@pytest.fixture
async def kube(kubeconfig):
    k = await Kube.load(str(kubeconfig))
    yield k
    await k.close()


async def http_get(tunnel: PodTunnel, path: str) -> dict:
    """GET ``path`` from the pod's tpenv-echo through the tunnel: its JSON answer (asserting a 200)."""
    reader, writer = await tunnel.open_stream(8080)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


async def roundtrip(tunnel: PodTunnel, size: int) -> bool:
    """``size`` random bytes to the pod's TCP echo and back; equal by sha256."""
    reader, writer = await tunnel.open_stream(9000)
    sent, got = hashlib.sha256(), hashlib.sha256()

    async def pump() -> None:
        for _ in range(size // 65536):
            block = os.urandom(65536)
            sent.update(block)
            writer.write(block)
            await writer.drain()

    task = asyncio.ensure_future(pump())
    n = 0
    while n < size:
        data = await reader.read(1 << 18)
        assert data, f"stream ended after {n} of {size} bytes"
        got.update(data)
        n += len(data)
    await task
    writer.close()
    await writer.wait_closed()
    return got.hexdigest() == sent.hexdigest()
