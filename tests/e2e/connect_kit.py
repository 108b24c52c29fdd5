"""What the tpenv connect e2e tests share: the manager (its relay) installed for a module, the
apps they reach (echo ``hello`` with a ClusterIP, a headless StatefulSet ``web``), and curl from
this machine.

The manager install is cluster-wide: run these modules under
``flock /tmp/tpenv-clusterwide.lock`` (tests/e2e README rule) so two engineers do not collide.

This machine (the host) cannot reach the cluster's pod and service ranges by itself
(docs/cluster.md "Network safety": unreachable routes), so a request that succeeds through tpenv
and fails without it proves the path went through tpenv.
"""
from __future__ import annotations

import subprocess

import pytest

from test_manager_relay import manager_logs  # noqa: F401  (re-exported for the connect tests)
from test_up_kit import echo_app
from test_webhook_injection import tpenv
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, live_pods, wait_until
from tests.kit.apps import testapp_image


def install_manager(cli_env: dict) -> None:
    tpenv("manager", "uninstall", env=cli_env)
    wait_until("namespace tpenv gone before install",
               lambda: kubectl("get", "namespace", "tpenv", check=False).returncode != 0, 120)
    cp = tpenv("manager", "install", env=cli_env)
    assert cp.returncode == 0, cp.stderr
    kubectl("rollout", "status", "deployment/tpenv-manager", "--timeout=180s", ns="tpenv", timeout=200)
    wait_until("the relay listening", lambda: "relay listening on ssh://127.0.0.1:8022" in manager_logs(), 60)


def headless_web() -> list[dict]:
    """StatefulSet ``web`` (1 replica) behind headless Service ``web``: pod name ``web-0.web.<ns>``."""
    labels = {"app": "web"}
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"clusterIP": "None", "selector": labels, "ports": [{"name": "http", "port": 8080}]}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "web"},
         "spec": {"serviceName": "web", "replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "terminationGracePeriodSeconds": 1,
                      "containers": [{"name": "app", "image": testapp_image(), "imagePullPolicy": "Never",
                                      "env": [{"name": "ECHO_QUIET", "value": "1"}],
                                      "ports": [{"name": "http", "containerPort": 8080}],
                                      "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}},
    ]


def deploy_apps(ns: str) -> dict:
    """hello (Deployment + Service, port 80 'web' -> 8080) and web-0 (headless), ready; their addresses."""
    apply([*echo_app("hello"), *headless_web()], ns=ns)
    kubectl("rollout", "status", "deployment/hello", "--timeout=120s", ns=ns, timeout=150)
    kubectl("rollout", "status", "statefulset/web", "--timeout=120s", ns=ns, timeout=150)
    pods = live_pods(ns, "app=hello")
    cluster_ip = kubectl_json("get", "service", "hello", ns=ns)["spec"]["clusterIP"]
    # kube-proxy programs a new Service's ClusterIP a moment after it exists (seconds on a busy
    # machine; until then the node answers "no route to host"): wait until a pod reaches it, so
    # the tests measure tpenv, not kube-proxy's lag.
    probe = f"import urllib.request; urllib.request.urlopen('http://{cluster_ip}/', timeout=3)"
    wait_until("kube-proxy to route the hello Service",
               lambda: kubectl("exec", "web-0", "--", "python3", "-c", probe, ns=ns, check=False).returncode == 0,
               timeout=60)
    # CoreDNS learns web-0's headless record from the EndpointSlice by its own watch, which lags
    # a Ready pod by a moment on a busy machine (the cold fresh-clone run once asked too early and
    # got no address): wait until a pod's own lookup of it answers, asked through the cluster DNS
    # (from hello, not web-0, whose /etc/hosts holds its own name).
    lookup = f"import socket; socket.getaddrinfo('web-0.web.{ns}.svc.cluster.local', 80)"
    wait_until("the cluster DNS to answer for web-0.web",
               lambda: kubectl("exec", "deploy/hello", "--", "python3", "-c", lookup, ns=ns,
                               check=False).returncode == 0,
               timeout=60)
    return {"cluster_ip": cluster_ip,
            "pod_ip": pods[0]["status"]["podIP"],
            "web_ip": kubectl_json("get", "pod", "web-0", ns=ns)["status"]["podIP"]}


def curl(*args: str, env: dict | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def manager(cli_env):
    install_manager(cli_env)
    try:
        yield
    finally:
        tpenv("manager", "uninstall", env=cli_env)
