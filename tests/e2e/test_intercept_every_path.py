"""Issue 11, every path in: traffic to the app's port on pod IPs meets the agent like Service traffic.

The in-pod redirect (ephemeral container tpenv-redirect that tpenv adds to each pod, or init
container tpenv-init for a user who may not add one) sends inbound TCP to the app's port to the agent,
so a caller reaches the intercept through a ClusterIP Service, a headless Service's pod DNS
names, a pod IP, or a gRPC client balancing over a headless Service by itself. Probes that name
the app's port pass through the agent (the pod stays Ready). A headless Service on a port the
app does not expose is refused, naming the conflict, with nothing changed.
"""
from __future__ import annotations

import json
import time

import pytest

from test_intercept_kit import Intercepting, agent_in_pods, client_pod, curl, echo_container, spec_of, tpenv, wait_for
from test_intercept_personal import LocalEcho
from security_kit import user_kubeconfig
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, live_pods
from tests.kit.apps import testapp_image
from tpenv.kits.kubeobjects import pod_is_ready
from tpenv_agent.inpod import redirect_state

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def who(body: str) -> str:
    return json.loads(body)["pod"]


def statefulset(ns: str, replicas: int) -> None:
    """db: a StatefulSet behind a headless Service (db-headless, the app's port 8080 named http)
    and a ClusterIP Service (db, port 80 -> http), as a Helm chart would make them."""
    apply([{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db-headless"},
            "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"name": "http", "port": 8080}]}},
           {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
            "spec": {"serviceName": "db-headless", "replicas": replicas, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": {"app": "db"}},
                     "template": {"metadata": {"labels": {"app": "db"}},
                                  "spec": {"terminationGracePeriodSeconds": 1,
                                           "containers": [echo_container("http")]}}}},
           {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"},
            "spec": {"selector": {"app": "db"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}}],
          ns=ns)
    kubectl("rollout", "status", "statefulset/db", "--timeout=240s", ns=ns, timeout=260)


def paths(ns: str, replicas: int) -> dict[str, str]:
    """Every way in: the ClusterIP Service, each pod's DNS name and each pod's IP (app port 8080)."""
    out = {"service": f"http://db.{ns}/"}
    pods = {p["metadata"]["name"]: p for p in live_pods(ns, "app=db")}
    for i in range(replicas):
        out[f"db-{i} by name"] = f"http://db-{i}.db-headless.{ns}.svc.cluster.local:8080/"
        out[f"db-{i} by IP"] = f"http://{pods[f'db-{i}']['status']['podIP']}:8080/"
    return out


def test_statefulset_every_path_global_and_header(namespace, tmp_path):
    ns, replicas = namespace, 3
    statefulset(ns, replicas)
    client_pod(ns)
    before = spec_of("statefulset", "db", ns), spec_of("service", "db", ns), spec_of("service", "db-headless", ns)
    laptop = LocalEcho("laptop")
    run = Intercepting(tmp_path, "statefulset/db", "--service", "db", "--port", f"{laptop.port}:web",
                       "--mount", "false", "-n", ns)
    try:
        # Stage 1: a global intercept takes every path: Service, each pod's DNS name, each pod IP.
        info = run.ready()
        assert len(info["pods"]) == replicas, info
        ways = paths(ns, replicas)
        wait_for("the laptop through the Service", lambda: who(curl(ns, ways["service"])) == "laptop", 60)
        # A pod's name under the headless Service resolves once CoreDNS has the rolled pod's new
        # address, which "ready" does not wait for (the Service path above does not need it).
        for way in ways:
            if "by name" in way:
                wait_for(f"{way} to resolve", lambda: curl(ns, ways[way]) is not None, 30)
        got = {way: who(curl(ns, url)) for way, url in ways.items()}
        assert got == {way: "laptop" for way in ways}, got
        # Nothing of the user's objects moved: the app keeps its port name, Services are untouched.
        assert spec_of("service", "db", ns) == before[1] and spec_of("service", "db-headless", ns) == before[2]
        # The redirect came as an ephemeral container that ran to exit 0 in every pod, with no init
        # container holding the app back (issue 13).
        wait_for("every pod's redirect to report exit 0",
                 lambda: [redirect_state(p)[0] for p in live_pods(ns, "app=db")] == ["done"] * replicas, 30)
        pods = live_pods(ns, "app=db")
        assert all(not p["spec"].get("initContainers") for p in pods), [p["spec"].get("initContainers") for p in pods]
        # Stage 1b: a pod restarted during the intercept comes back without its redirect (its
        # template has none); tpenv adds it, and that pod's IP reaches the laptop again.
        old = next(p["metadata"]["uid"] for p in pods if p["metadata"]["name"] == "db-1")
        kubectl("delete", "pod", "db-1", "--wait=true", ns=ns, timeout=120)

        def back() -> bool:
            new = [p for p in live_pods(ns, "app=db") if p["metadata"]["name"] == "db-1"]
            return bool(new) and new[0]["metadata"]["uid"] != old and redirect_state(new[0])[0] == "done"

        wait_for("db-1 back with its redirect, added by tpenv", back, 120)
        wait_for("db-1's new IP to the laptop", lambda: who(curl(ns, paths(ns, replicas)["db-1 by IP"])) == "laptop", 90)
    finally:
        assert run.stop() == 0, "".join(run.stderr)
    # Stage 1c: a pod restarted while no tpenv runs comes back with the agent but without the
    # redirect (nobody adds it): its callers reach the app, as through an agent in passthrough.
    old = next(p["metadata"]["uid"] for p in live_pods(ns, "app=db") if p["metadata"]["name"] == "db-2")
    kubectl("delete", "pod", "db-2", "--wait=true", ns=ns, timeout=120)
    wait_for("db-2 back, Ready", lambda: any(
        p["metadata"]["name"] == "db-2" and p["metadata"]["uid"] != old and pod_is_ready(p)
        for p in live_pods(ns, "app=db")), 120)
    db2 = next(p for p in live_pods(ns, "app=db") if p["metadata"]["name"] == "db-2")
    assert redirect_state(db2) == ("missing", ""), db2["spec"].get("ephemeralContainers")
    assert who(curl(ns, f"http://{db2['status']['podIP']}:8080/")) == "db-2"
    header = Intercepting(tmp_path, "statefulset/db", "--service", "db", "--port", f"{laptop.port}:web",
                          "--http-header", "x-dev=alice", "--mount", "false", "-n", ns)
    try:
        # Stage 2: a header intercept: matched requests reach the laptop on all three paths,
        # unmatched ones the app in the pod they were sent to (the agent is already there; the
        # intercept gave db-2 its redirect, and was ready only once it had run).
        header.ready()
        assert [redirect_state(p)[0] for p in live_pods(ns, "app=db")] == ["done"] * replicas
        ways = paths(ns, replicas)
        wait_for("the header intercept", lambda: who(curl(ns, ways["service"], "x-dev: alice")) == "laptop", 60)
        for way, url in ways.items():
            assert who(curl(ns, url, "x-dev: alice")) == "laptop", way
            plain = who(curl(ns, url))
            assert plain.startswith("db-"), (way, plain)
            if way != "service":
                assert plain == way.split()[0], (way, plain)  # the addressed pod's own app answered
            assert who(curl(ns, url, "x-dev: bob")).startswith("db-"), way
    finally:
        header.stop()
        laptop.close()
    # Stage 3: uninstall gives back the objects as they were.
    tpenv(tmp_path, "uninstall", "--agent", "statefulset/db", "-n", ns)
    assert (spec_of("statefulset", "db", ns), spec_of("service", "db", ns),
            spec_of("service", "db-headless", ns)) == before
    assert agent_in_pods(ns, "app=db") == []


GRPC_CLIENT = """
import grpc, json, sys, time
# Client-side balancing: the channel resolves every pod IP of the headless Service and dials
# each one itself (round_robin); kube-proxy never sees these connections.
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.lb_policy_name", "round_robin")])
grpc.channel_ready_future(ch).result(timeout=30)
say = ch.unary_unary("/echo.Echo/Say")
# Warm up until the balancer has a connection to every pod (subchannels connect one by one).
seen = set()
for _ in range(60):
    seen.add(json.loads(say(b"", timeout=15))["pod"])
    if len(seen) >= int(sys.argv[3]):
        break
    time.sleep(0.5)
out = []
for i in range(int(sys.argv[2])):
    # One in three matched: with two pods in the rotation, every other call would keep the
    # matched ones on one pod and the rest on the other.
    md = [("x-dev", "alice")] if i % 3 == 0 else [("x-dev", "bob")]
    out.append({"matched": i % 3 == 0, "pod": json.loads(say(b"", metadata=md, timeout=15))["pod"]})
print(json.dumps(out))
"""


def test_grpc_client_side_balancing_over_headless_service(namespace, tmp_path):
    ns, replicas = namespace, 2
    statefulset(ns, replicas)
    client_pod(ns)
    laptop = LocalEcho("laptop")
    run = Intercepting(tmp_path, "statefulset/db", "--service", "db", "--port", f"{laptop.port}:web",
                       "--http-header", "x-dev=alice", "--mount", "false", "-n", ns)
    try:
        # Stage 1: the intercept is ready on every pod.
        assert len(run.ready()["pods"]) == replicas
        ways = paths(ns, replicas)
        wait_for("the header intercept", lambda: who(curl(ns, ways["db-0 by IP"], "x-dev: alice")) == "laptop", 60)
        # Stage 2: a gRPC client balancing by itself over the headless Service's pod IPs: its
        # matched streams reach the laptop, the others the pods, spread over both. The cluster
        # DNS learns the rolled-out pods' addresses by its own watch, a moment after they are
        # Ready (the intercept's "ready" does not wait for CoreDNS): until it lists them all.
        name = f"db-headless.{ns}.svc.cluster.local"
        lookup = "import socket, sys; print(len({a[4][0] for a in socket.getaddrinfo(sys.argv[1], 8080)}))"
        wait_for("the cluster DNS to list every pod of db-headless", lambda: kubectl(
            "exec", "client", "--", "python3", "-c", lookup, name, ns=ns, check=False).stdout.strip() == str(replicas), 60)
        target = f"dns:///{name}:8080"
        cp = kubectl("exec", "client", "--", "python3", "-c", GRPC_CLIENT, target, "30", str(replicas), ns=ns,
                     timeout=180)
        calls = json.loads(cp.stdout)
        assert [c["pod"] for c in calls if c["matched"]] == ["laptop"] * 10, calls
        others = [c["pod"] for c in calls if not c["matched"]]
        assert all(p.startswith("db-") for p in others) and len(set(others)) == replicas, calls
    finally:
        run.stop()
        laptop.close()


def two_containers(ns: str) -> None:
    """web: a metrics sidecar first (port 9090), the app second (port 8080 named web); the Service's
    targetPort, the readiness and the liveness probe all name the second container's port."""
    metrics = {"name": "metrics", "image": testapp_image(), "imagePullPolicy": "Never",
               "command": ["tpenv-echo", "--port", "9090"], "ports": [{"name": "metrics", "containerPort": 9090}]}
    app = {"name": "app", "image": testapp_image(), "imagePullPolicy": "Never", "command": ["tpenv-echo"],
           "ports": [{"name": "web", "containerPort": 8080}],
           "readinessProbe": {"httpGet": {"path": "/ready", "port": "web"}, "periodSeconds": 2},
           "livenessProbe": {"httpGet": {"path": "/live", "port": "web"}, "periodSeconds": 2, "failureThreshold": 2}}
    apply([{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"terminationGracePeriodSeconds": 1, "containers": [metrics, app]}}}},
           {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}}],
          ns=ns)
    kubectl("rollout", "status", "deployment/web", "--timeout=180s", ns=ns, timeout=200)


def test_probes_naming_the_second_containers_port_keep_the_pod_ready(namespace, tmp_path):
    ns = namespace
    two_containers(ns)
    client_pod(ns)
    laptop = LocalEcho("laptop")
    run = Intercepting(tmp_path, "deployment/web", "--port", f"{laptop.port}:http", "--mount", "false", "-n", ns)
    try:
        # Stage 1: the intercept picks the container that declares the Service's targetPort.
        info = run.ready()
        pod = kubectl_json("get", "pod", info["pods"][0], ns=ns)
        agent = next(c for c in pod["spec"]["containers"] if c["name"] == "tpenv-agent")
        assert agent["args"][agent["args"].index("--container") + 1] == "app"
        app = next(c for c in pod["spec"]["containers"] if c["name"] == "app")
        assert app["ports"] == [{"name": "web", "containerPort": 8080, "protocol": "TCP"}]
        assert app["readinessProbe"]["httpGet"]["port"] == "web" and app["livenessProbe"]["httpGet"]["port"] == "web"
        wait_for("the laptop's answer", lambda: who(curl(ns, f"http://web.{ns}/")) == "laptop", 60)
        # (The `transitions` branch adds here: the env is the app container's, its image's ENV included.)
        # Stage 2: a minute with the intercept on: probes pass (through the agent to the app),
        # the pod stays Ready and nothing restarts.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(10)
            pod = kubectl_json("get", "pod", info["pods"][0], ns=ns)
            ready = next(c["status"] for c in pod["status"]["conditions"] if c["type"] == "Ready")
            restarts = {c["name"]: c["restartCount"] for c in pod["status"]["containerStatuses"]}
            assert ready == "True" and set(restarts.values()) == {0}, (ready, restarts)
        assert who(curl(ns, f"http://web.{ns}/")) == "laptop"
    finally:
        run.stop()
        laptop.close()


def test_headless_service_on_a_port_the_app_does_not_expose_is_refused(namespace, tmp_path):
    ns = namespace
    apply([{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "api"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "api"}},
                     "template": {"metadata": {"labels": {"app": "api"}},
                                  "spec": {"containers": [echo_container("http")]}}}},
           {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api-metrics"},
            "spec": {"clusterIP": "None", "selector": {"app": "api"}, "ports": [{"name": "metrics", "port": 9187}]}}],
          ns=ns)
    before = spec_of("deployment", "api", ns), spec_of("service", "api-metrics", ns)
    cp = tpenv(tmp_path, "intercept", "deployment/api", "--service", "api-metrics", "--port", "9999:metrics",
               "--mount", "false", "-n", ns, check=False)
    # A clear error naming the conflict, and nothing changed in the cluster.
    assert cp.returncode != 0
    err = cp.stderr
    assert "headless Service/api-metrics targets port 9187" in err and "app:8080/TCP" in err, err
    assert "Traceback" not in err
    assert (spec_of("deployment", "api", ns), spec_of("service", "api-metrics", ns)) == before


def test_pod_security_baseline_falls_back_to_the_hand_over_and_says_so(namespace, tmp_path):
    ns = namespace
    # Stage 1: the namespace forbids NET_ADMIN (baseline); the probes name the app's port.
    kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=baseline")
    two_containers(ns)
    client_pod(ns)
    before = spec_of("deployment", "web", ns), spec_of("service", "web", ns)
    laptop = LocalEcho("laptop")
    run = Intercepting(tmp_path, "deployment/web", "--port", f"{laptop.port}:http", "--mount", "false", "-n", ns)
    try:
        # Stage 2: Service traffic is intercepted; the app's port and its probes were renamed
        # together (no init container), so the pod is Ready; the bypass is said once.
        info = run.ready()
        pod = kubectl_json("get", "pod", info["pods"][0], ns=ns)
        assert "initContainers" not in pod["spec"]
        app = next(c for c in pod["spec"]["containers"] if c["name"] == "app")
        assert app["ports"][0]["name"] == "tpx-web"
        assert app["readinessProbe"]["httpGet"]["port"] == "tpx-web" == app["livenessProbe"]["httpGet"]["port"]
        assert next(c["status"] for c in pod["status"]["conditions"] if c["type"] == "Ready") == "True"
        wait_for("the laptop's answer", lambda: who(curl(ns, f"http://web.{ns}/")) == "laptop", 60)
        said = "".join(run.stderr)
        assert said.count("only traffic through a Service with a cluster IP reaches the agent") == 1, said
        assert "enforces Pod Security level 'baseline'" in said, said
    finally:
        run.stop()
        laptop.close()
    # Stage 3: uninstall restores the workload, probes included.
    tpenv(tmp_path, "uninstall", "--agent", "deployment/web", "-n", ns)
    assert (spec_of("deployment", "web", ns), spec_of("service", "web", ns)) == before


def test_a_user_who_may_not_add_ephemeral_containers_gets_the_init_container(namespace, kubeconfig, tmp_path):
    ns = namespace
    # Stage 1: a developer whose Role has pods but not pods/ephemeralcontainers (security_kit).
    config, _ = user_kubeconfig(ns, "carol", kubeconfig, tmp_path)
    apply([{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "api"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "api"}},
                     "template": {"metadata": {"labels": {"app": "api"}},
                                  "spec": {"terminationGracePeriodSeconds": 1,
                                           "containers": [echo_container("http")]}}}},
           {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
            "spec": {"selector": {"app": "api"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}],
          ns=ns)
    kubectl("rollout", "status", "deployment/api", "--timeout=180s", ns=ns, timeout=200)
    client_pod(ns)
    laptop = LocalEcho("laptop")
    run = Intercepting(tmp_path, "deployment/api", "--port", f"{laptop.port}:http", "--mount", "false", "-n", ns,
                       env={"KUBECONFIG": str(config)})
    try:
        # Stage 2: the intercept works, the redirect installed by the init container instead,
        # and no ephemeral container was tried: the pod IP reaches the laptop.
        info = run.ready()
        pod = kubectl_json("get", "pod", info["pods"][0], ns=ns)
        assert [c["name"] for c in pod["spec"].get("initContainers") or []] == ["tpenv-init"]
        assert not pod["spec"].get("ephemeralContainers")
        wait_for("the pod IP to the laptop",
                 lambda: who(curl(ns, f"http://{pod['status']['podIP']}:8080/")) == "laptop", 60)
    finally:
        assert run.stop() == 0, "".join(run.stderr)
        laptop.close()
