"""tpenv connect's direct paths against the real cluster (tpenv/engine/outbound/direct.py): a
connection to a Service's ClusterIP or an endpoint pod's address goes on its own port-forward
stream to a ready endpoint pod, balanced per connection, kept current by the EndpointSlice watch,
with a pre-opened spare for the next one; without the right to port-forward in the namespace
(or for a port the Service does not have) the relay carries it as before.

Stages: (1) the core sees the namespace's Services and slices; (2) connections to the ClusterIP
reach both replicas, every one direct; (3) the next connection takes a pre-opened spare; (4) a
pod address goes direct; a port the Service lacks goes to the relay; the client's EOF
closes the stream after a linger; (5) one replica gone: the
watch moves new connections to the other; (6) a user with the relay right only: the relay.

Cluster-wide (manager install): run under flock /tmp/tpenv-clusterwide.lock.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json

import pytest

from connect_kit import deploy_apps, manager  # noqa: F401  (module fixture)
from test_connect_names import Upstream
from test_webhook_injection import agent_image, cli_env  # noqa: F401  (module fixtures, reused)
from tests.cluster.pytest_plugin import apply, kubectl, live_pods
from tpenv.engine.outbound import direct as direct_module
from tpenv.engine.outbound.core import ConnectOptions, OutboundCore
from tpenv.errors import TpenvError
from tpenv.kits.kube import Kube

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


async def get(core: OutboundCore, host: str, port: int, path: str) -> dict:
    """One HTTP request on a fresh connection through ``core.dial``: the echo's JSON answer."""
    reader, writer = await core.dial(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200"), (host, raw[:200])
    return json.loads(raw.partition(b"\r\n\r\n")[2])


async def until(what: str, check, timeout: float = 60.0) -> None:
    """``check()`` true within ``timeout`` (the watch's and the spare's work is asynchronous)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


@pytest.fixture
async def kube(kubeconfig):
    k = await Kube.load(str(kubeconfig))
    try:
        yield k
    finally:
        await k.close()


async def test_services_go_direct_balanced_and_follow_their_endpoints(manager, kube, namespace, monkeypatch):
    ns = namespace
    apps = deploy_apps(ns)
    kubectl("scale", "deployment/hello", "--replicas=2", ns=ns)
    kubectl("rollout", "status", "deployment/hello", "--timeout=120s", ns=ns, timeout=150)
    pods = sorted(p["metadata"]["name"] for p in live_pods(ns, "app=hello"))
    ip = ipaddress.ip_address(apps["cluster_ip"])

    async with OutboundCore(kube, ConnectOptions(namespace=ns), upstream=Upstream()) as core:
        direct = core.direct
        # -- stage 1: the namespace is served directly, its Service known with both endpoints ----
        assert direct is not None and ns in direct.views and ns not in direct.skipped
        await until("both hello endpoints in the view", lambda: len((direct.route(ip, 80) or ("", []))[1]) == 2)

        # -- stage 2: 24 connections to the ClusterIP, each on its own stream, both pods answer ---
        answered = [(await get(core, apps["cluster_ip"], 80, f"/n{i}"))["pod"] for i in range(24)]
        assert sorted(set(answered)) == pods, answered
        assert direct.stats["direct"] == 24 and direct.stats["relay"] == 0, direct.stats

        # -- stage 3: a spare is pre-opened after a use; the next connection takes it ------------
        await until("a spare stream", lambda: bool(direct._spares))
        taken = direct.stats["spare"]
        for _ in range(4):  # each pod has its spare: a few connections take at least one
            await get(core, apps["cluster_ip"], 80, "/spare")
        assert direct.stats["spare"] > taken, direct.stats

        # -- stage 4: a pod address goes direct; a port the Service lacks goes to the relay -------
        before = dict(direct.stats)
        assert (await get(core, apps["web_ip"], 8080, "/pod"))["pod"] == "web-0"
        assert direct.stats["direct"] == before["direct"] + 1
        with contextlib.suppress(TpenvError, OSError, asyncio.IncompleteReadError, AssertionError):
            await get(core, apps["cluster_ip"], 81, "/nothing")  # the relay's answer (refused): not ours
        assert direct.stats["relay"] == before["relay"] + 1 and direct.stats["direct"] == before["direct"] + 1

        # -- stage 4b: the client's EOF (no half-close in a WebSocket port-forward): the answer
        # still arrives, then the stream closes after the linger, although the app keeps the
        # keep-alive connection open (it would otherwise stay open until the app's idle timeout)
        monkeypatch.setattr(direct_module, "LINGER_AFTER_EOF", 2.0)
        reader, writer = await core.dial(apps["cluster_ip"], 80)
        writer.write(b"GET /half-closed HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.write_eof()
        raw = await asyncio.wait_for(reader.read(), 60)  # EOF: the stream was closed by the linger
        assert raw.startswith(b"HTTP/1.1 200") and b"/half-closed" in raw, raw[:200]
        writer.close()

        # -- stage 5: one replica gone: the watch takes it out, new connections reach the other ---
        kubectl("scale", "deployment/hello", "--replicas=1", ns=ns)
        await until("one hello endpoint left", lambda: len((direct.route(ip, 80) or ("", []))[1]) == 1, 120)
        (left,) = [pod for pod, _ in direct.route(ip, 80)[1]]
        assert {(await get(core, apps["cluster_ip"], 80, "/after"))["pod"] for _ in range(6)} == {left}


async def test_without_the_port_forward_right_the_relay_carries_it(manager, kubeconfig, namespace):
    from test_manager_relay import as_user

    ns = namespace
    apps = deploy_apps(ns)
    # A user with the relay's Role only: no pods/portforward (nor anything else) in the namespace.
    apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
           "metadata": {"name": f"relay-only-{ns}", "namespace": "tpenv"},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tpenv-relay-client"},
           "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "relay-only"}]})
    dev = await as_user(kubeconfig, "relay-only")
    try:
        async with OutboundCore(dev, ConnectOptions(namespace=ns), upstream=Upstream()) as core:
            # -- stage 1: the namespace is left to the relay, and why is recorded ------------------
            assert ns not in core.direct.views and "portforward" in core.direct.skipped[ns]
            # -- stage 2: the ClusterIP still answers, through the relay --------------------------
            assert (await get(core, apps["cluster_ip"], 80, "/relayed"))["path"] == "/relayed"
            assert core.direct.stats == {"direct": 0, "relay": 1, "spare": 0}
    finally:
        await dev.close()
        kubectl("delete", "rolebinding", f"relay-only-{ns}", ns="tpenv", check=False)
