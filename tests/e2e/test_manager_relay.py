"""The manager's outbound relay (docs/protocol.md §7) on the real cluster, through RelaySession.

In file order, sharing one install (the approach of test_webhook_injection.py: uninstall any
leftover, install with this checkout's agent image, uninstall at the end):
(1) the manager's pod logs its relay listening, on loopback, with the discovered ranges;
(2) an echo Deployment + Service: ``resolve`` gives the Service's ClusterIP (short name with a
namespace, and ``hello.<ns>``), an unknown name is NotFound, and ``open_connection`` reaches the
echo server by Service name, by ClusterIP and by pod IP;
(3) destinations outside the cluster ranges (the manager's loopback, 8.8.8.8, a node's address)
are refused by the relay's policy, with its reason, before anything is dialled (the manager logs
the refusal; no lookup or connect happens for an address);
(4) a certificate from another CA, or a host key that is not the relay's, is refused;
(5) Role tpenv-relay-client is enough to use the relay, and without it a user cannot.
"""
from __future__ import annotations

import asyncio
import base64
import json

import pytest

from test_up_kit import echo_app
from test_webhook_injection import agent_image, cli_env, tpenv  # noqa: F401  (module fixtures, reused)
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, live_pods, wait_until
from tpenv.errors import Forbidden, NotFound, PermanentError, TransientError
from tpenv.kits.agent_client import make_auth_material
from tpenv.kits.kube import Kube
from tpenv.kits.relay_client import RelaySession

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def manager_logs() -> str:
    return kubectl("logs", "deployment/tpenv-manager", ns="tpenv", check=False).stdout


@pytest.fixture(scope="module")
def relay_manager(cli_env):  # noqa: F811
    tpenv("manager", "uninstall", env=cli_env)
    wait_until("namespace tpenv gone before install",
               lambda: kubectl("get", "namespace", "tpenv", check=False).returncode != 0, 120)
    cp = tpenv("manager", "install", env=cli_env)
    assert cp.returncode == 0, cp.stderr
    try:
        kubectl("rollout", "status", "deployment/tpenv-manager", "--timeout=180s", ns="tpenv", timeout=200)
        wait_until("the relay listening", lambda: "relay listening on ssh://127.0.0.1:8022" in manager_logs(), 60)
        yield
    finally:
        tpenv("manager", "uninstall", env=cli_env)


@pytest.fixture
async def kube(kubeconfig):
    k = await Kube.load(str(kubeconfig))
    yield k
    await k.close()


@pytest.fixture
def hello(namespace) -> dict:
    """The echo app ``hello`` (Service port 80 -> 8080), ready; its ClusterIP and pod IP."""
    name = "hello"
    apply(echo_app(name), ns=namespace)
    kubectl("rollout", "status", f"deployment/{name}", "--timeout=120s", ns=namespace, timeout=150)
    svc = kubectl_json("get", "service", name, ns=namespace)
    pods = live_pods(namespace, f"app={name}")
    return {"cluster_ip": svc["spec"]["clusterIP"], "pod_ip": pods[0]["status"]["podIP"]}


async def http_get(relay: RelaySession, host: str, port: int, path: str = "/") -> dict:
    reader, writer = await relay.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: hello\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


async def routed(relay: RelaySession, host: str, port: int, path: str) -> dict:
    """The first answer through a new Service: kube-proxy programs it a moment after the API has
    it, with no event to wait for, so the connect is retried (EHOSTUNREACH until then)."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        try:
            return await http_get(relay, host, port, path)
        except TransientError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


# --- stage 1: the relay is up, on loopback, with the cluster's ranges ----------------------------------

def test_the_manager_runs_the_relay_on_its_loopback(relay_manager):
    logs = manager_logs()
    assert "[relay/auth] Secret tpenv-auth in tpenv created" in logs
    assert "10.96.0.0/16" in logs  # the ServiceCIDR, discovered
    (pod,) = kubectl_json("get", "pods", "-l", "app.kubernetes.io/name=tpenv-manager", ns="tpenv")["items"]
    ports = [p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports") or []]
    assert 8022 not in ports
    svc = kubectl_json("get", "service", "tpenv-manager", ns="tpenv")
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["https"]


# --- stage 2: names and connections ---------------------------------------------------------------------

async def test_resolve_and_connect_to_a_service_and_a_pod(relay_manager, namespace, hello, kube):
    ns = namespace
    async with RelaySession(kube) as relay:
        answer = await relay.resolve("hello", namespace=ns)
        assert answer["addresses"] == [hello["cluster_ip"]]
        assert answer["name"] == f"hello.{ns}.svc.cluster.local"
        assert (await relay.resolve(f"hello.{ns}"))["addresses"] == [hello["cluster_ip"]]
        with pytest.raises(NotFound, match="nothing-here"):
            await relay.resolve(f"nothing-here.{ns}.svc.cluster.local")
        with pytest.raises(NotFound):
            await relay.resolve("nothing-here", namespace=ns)

        by_name = await routed(relay, f"hello.{ns}", 80, "/by-name")
        assert by_name["path"] == "/by-name" and by_name["source"] == "cluster"
        by_ip = await http_get(relay, hello["cluster_ip"], 80, "/by-cluster-ip")
        assert by_ip["path"] == "/by-cluster-ip"
        by_pod = await http_get(relay, hello["pod_ip"], 8080, "/by-pod-ip")
        assert by_pod["path"] == "/by-pod-ip"
        # Several connections at once over the one SSH connection.
        answers = await asyncio.gather(*(http_get(relay, f"hello.{ns}", 80, f"/n{i}") for i in range(8)))
        assert sorted(a["path"] for a in answers) == sorted(f"/n{i}" for i in range(8))
    logs = manager_logs()
    assert f"[relay/{relay.session_id}] session connected" in logs
    assert f"to hello.{ns}:80 via {hello['cluster_ip']} opened" in logs


# --- stage 3: refused destinations ------------------------------------------------------------------------

async def test_destinations_outside_the_cluster_are_refused_before_any_packet(relay_manager, kube):
    node_ip = next(a["address"] for a in kubectl_json("get", "nodes")["items"][0]["status"]["addresses"]
                   if a["type"] == "InternalIP")
    cases = {("127.0.0.1", 22): "loopback", ("8.8.8.8", 53): "outside the cluster's pod and service ranges",
             ("169.254.169.254", 80): "link-local", (node_ip, 10250): "node's address"}
    async with RelaySession(kube) as relay:
        for (host, port), why in cases.items():
            with pytest.raises(Forbidden) as e:
                await relay.open_connection(host, port)
            assert f"the relay refused {host}:{port}: relay: " in str(e.value) and why in str(e.value)
        assert await relay.ping() > 0  # refusals leave the session usable
    logs = manager_logs()
    for host, port in cases:
        assert f"to {host}:{port} refused: relay: " in logs
        assert f"to {host}:{port} via" not in logs  # never dialled


# --- stage 4: no valid certificate, no relay ----------------------------------------------------------------

async def test_a_certificate_of_another_ca_or_another_host_key_is_refused(relay_manager, kube):
    secret = kubectl_json("get", "secret", "tpenv-auth", ns="tpenv")["data"]
    real = {k: base64.b64decode(secret[k]) for k in ("ca_key", "host_key.pub")}
    other = make_auth_material()
    relay = RelaySession(kube, material={"ca_key": other["ca_key"], "host_key.pub": real["host_key.pub"]})
    with pytest.raises(Forbidden, match="the relay refused this session's certificate"):
        await relay.connect()
    relay.close()
    await relay.wait_closed()
    relay.close()  # safe twice
    impostor = RelaySession(kube, material={"ca_key": real["ca_key"], "host_key.pub": other["host_key.pub"]})
    with pytest.raises(PermanentError, match="host key is not the one in Secret tpenv-auth"):
        await impostor.connect()
    impostor.close()
    await impostor.wait_closed()


# --- stage 5: the client Role ---------------------------------------------------------------------------------

class KubeAs(Kube):
    """The same kubeconfig, impersonating another user (the test's admin may impersonate)."""

    user = ""

    def auth_headers(self) -> dict[str, str]:
        return {**super().auth_headers(), "Impersonate-User": self.user}


async def as_user(kubeconfig, user: str) -> KubeAs:
    k = await KubeAs.load(str(kubeconfig))
    k.user = user
    k.api.set_default_header("Impersonate-User", user)
    return k


async def test_the_relay_client_role_is_enough_and_needed(relay_manager, namespace, hello, kubeconfig):
    apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
           "metadata": {"name": "relay-dev", "namespace": "tpenv"},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tpenv-relay-client"},
           "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "relay-dev"}]})
    try:
        dev = await as_user(kubeconfig, "relay-dev")
        try:
            async with RelaySession(dev) as relay:
                answer = await routed(relay, f"hello.{namespace}", 80, "/as-relay-dev")
                assert answer["path"] == "/as-relay-dev"
        finally:
            await dev.close()
        for what in (("get", "secret/tpenv-manager-tls"), ("list", "secrets"), ("delete", "pods")):
            cp = kubectl("auth", "can-i", *what, "--as=relay-dev", ns="tpenv", check=False)
            assert cp.stdout.strip() == "no", what
        stranger = await as_user(kubeconfig, "not-a-relay-user")
        try:
            with pytest.raises(Forbidden):
                async with RelaySession(stranger):
                    pass
        finally:
            await stranger.close()
    finally:
        kubectl("delete", "rolebinding", "relay-dev", ns="tpenv", check=False)
