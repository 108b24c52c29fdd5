"""Issue 12, Done-when 4: the webhook fails safe and loud. Each failure tried for real, each ending
with the workload's pods running (injected or not) and `tpenv doctor` saying what happened:

1. installed with a 3-minute certificate (TPENV_MANAGER_CERT_LIFETIME_SECONDS=180): an opted-in
   Deployment's pod gets the agent; doctor warns that the certificate expires soon;
2. Secret tpenv-auth deleted under running agents: doctor names the namespace; a new pod is
   injected anyway (the manager makes the Secret again before admitting it) and runs;
3. the certificate near expiry: the manager renews it itself (Secret and caBundle change, no
   install, no upgrade), and a pod created after that is still injected (the API server trusts
   the new certificate);
4. the manager down (scaled to 0): a new pod starts without the agent (failurePolicy Ignore,
   never pending); doctor fails cluster/manager and lists the pod as started without the agent.

In each of stages 1, 2 and 4 `tpenv status -o json` (no session running) carries the same
warning in its `warnings` list, so a developer sees it where they look.

Cluster-wide (installs the manager): run under the lock,
flock /tmp/tpenv-clusterwide.lock .venv/bin/python -m pytest tests/e2e/test_security_webhook.py
"""
from __future__ import annotations

import base64
import json

import pytest

from test_doctor import check, doctor
from test_webhook_injection import agent_image, cli_env  # noqa: F401  (module fixtures)
from test_webhook_injection import tpenv as tpenv_cli
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, live_pods, wait_until
from tests.kit.apps import testapp_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

LIFETIME = 180


def app() -> list[dict]:
    labels = {"app": "shop"}
    return [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "shop"},
             "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                      "template": {"metadata": {"labels": {**labels, "tpenv.io/inject-agent": "enabled"}},
                                   "spec": {"terminationGracePeriodSeconds": 1, "containers": [
                                       {"name": "shop", "image": testapp_image(), "imagePullPolicy": "Never",
                                        "command": ["tpenv-echo"],
                                        "ports": [{"name": "http", "containerPort": 8080}],
                                        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shop"},
             "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}]


def roll(ns: str) -> dict:
    """Restart the Deployment; its one new pod once the rollout is done and it runs (never pending)."""
    kubectl("rollout", "restart", "deployment/shop", ns=ns)
    kubectl("rollout", "status", "deployment/shop", "--timeout=240s", ns=ns, timeout=260)

    def settled() -> dict | None:
        pods = live_pods(ns, "app=shop")
        return pods[0] if len(pods) == 1 and pods[0]["status"].get("phase") == "Running" else None
    return wait_until("one Running pod of shop", settled, timeout=120)


def has_agent(pod: dict) -> bool:
    return any(c["name"] == "tpenv-agent" for c in pod["spec"]["containers"])


def tls_secret() -> dict:
    return kubectl_json("get", "secret", "tpenv-manager-tls", ns="tpenv")["data"]


def ca_bundle() -> bytes:
    hooks = kubectl_json("get", "mutatingwebhookconfiguration", "tpenv-agent-injector")["webhooks"]
    return base64.b64decode(hooks[0]["clientConfig"]["caBundle"])


def status_warnings(ns: str, env: dict) -> dict[str, dict]:
    """`tpenv status -o json -n NS`'s warnings by check name (no session runs here: exit 1)."""
    cp = tpenv_cli("-o", "json", "status", "-n", ns, env=env)
    return {w["name"]: w for w in json.loads(cp.stdout)["warnings"]}


def test_webhook_fails_safe_and_loud(cli_env, namespace, tmp_path):  # noqa: F811
    ns = namespace
    env = {**cli_env, "TPENV_MANAGER_CERT_LIFETIME_SECONDS": str(LIFETIME)}
    tpenv_cli("manager", "uninstall", env=env)
    wait_until("namespace tpenv gone before install",
               lambda: kubectl("get", "namespace", "tpenv", check=False).returncode != 0, 180)
    cp = tpenv_cli("manager", "install", "--webhook-namespace", ns, env=env)
    assert cp.returncode == 0, cp.stderr
    try:
        kubectl("rollout", "status", "deployment/tpenv-manager", "--timeout=180s", ns="tpenv", timeout=200)
        first = tls_secret()

        # Stage 1: injected; doctor warns that the (3-minute) certificate expires soon.
        apply(app(), ns=ns)
        kubectl("rollout", "status", "deployment/shop", "--timeout=240s", ns=ns, timeout=260)
        pod = wait_until("shop's pod injected and running", lambda: next(
            (p for p in kubectl_json("get", "pods", "-l", "app=shop", ns=ns)["items"]
             if has_agent(p) and p["status"].get("phase") == "Running"), None), 120)
        assert has_agent(pod)
        code, report = doctor(tmp_path, ns, env={"KUBECONFIG": env["KUBECONFIG"]})
        hook = check(report, "cluster/webhook")
        assert hook["status"] == "warn" and "certificate expires" in hook["detail"], hook
        shown = status_warnings(ns, env)
        assert "certificate expires" in shown["cluster/webhook"]["detail"], shown

        # Stage 2: Secret tpenv-auth deleted: doctor names it; the next pod is injected and runs.
        kubectl("delete", "secret", "tpenv-auth", ns=ns)
        code, report = doctor(tmp_path, ns, env={"KUBECONFIG": env["KUBECONFIG"]})
        hook = check(report, "cluster/webhook")
        assert "Secret tpenv-auth is missing in " + ns in hook["detail"], hook
        shown = status_warnings(ns, env)
        assert "Secret tpenv-auth is missing in " + ns in shown["cluster/webhook"]["detail"], shown
        pod = roll(ns)
        assert has_agent(pod) and pod["status"]["phase"] == "Running", pod["status"]
        assert kubectl("get", "secret", "tpenv-auth", ns=ns, check=False).returncode == 0
        code, report = doctor(tmp_path, ns, env={"KUBECONFIG": env["KUBECONFIG"]})
        assert "tpenv-auth is missing" not in check(report, "cluster/webhook")["detail"]

        # Stage 3: the manager renews its certificate itself (two thirds into 3 minutes), and the
        # API server keeps calling the webhook: a pod made afterwards is injected.
        renewed = wait_until("the manager to renew its certificate",
                             lambda: (lambda s: s if s["tls.crt"] != first["tls.crt"] else None)(tls_secret()),
                             timeout=LIFETIME * 2)
        assert base64.b64decode(renewed["ca.crt"]) in ca_bundle()
        logs = kubectl("logs", "deployment/tpenv-manager", ns="tpenv").stdout
        assert "[tls/rotate] webhook certificate renewed" in logs, logs[-2000:]
        pod = roll(ns)
        assert has_agent(pod) and pod["status"]["phase"] == "Running", pod["metadata"]

        # Stage 4: the manager down: a new pod starts, without the agent; doctor says both.
        kubectl("scale", "deployment/tpenv-manager", "--replicas=0", ns="tpenv")
        wait_until("the manager pods gone", lambda: not kubectl_json(
            "get", "pods", "-l", "app.kubernetes.io/name=tpenv-manager", ns="tpenv")["items"], 180)
        pod = roll(ns)
        assert not has_agent(pod) and pod["status"]["phase"] == "Running"
        code, report = doctor(tmp_path, ns, env={"KUBECONFIG": env["KUBECONFIG"]})
        assert code == 1 and check(report, "cluster/manager")["status"] == "fail"
        hook = check(report, "cluster/webhook")
        assert f"{ns}/{pod['metadata']['name']}" in hook["detail"] and "without the agent" in hook["detail"], hook
        shown = status_warnings(ns, env)
        assert shown["cluster/manager"]["status"] == "fail" and "scaled to 0" in shown["cluster/manager"]["detail"]
        assert f"{ns}/{pod['metadata']['name']}" in shown["cluster/webhook"]["detail"], shown
    finally:
        tpenv_cli("manager", "uninstall", env=env)
