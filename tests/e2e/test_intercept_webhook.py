"""Webhook mode (GitOps): the manager injects the agent at pod creation; `tpenv intercept` uses it
and never patches the workload, so Git and the cluster do not differ.
"""
from __future__ import annotations

import json

import pytest

from test_intercept_kit import Intercepting, LocalServer, client_pod, curl, echo_container, spec_of, tpenv, wait_for
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json
from tests.kit.apps import testapp_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_intercept_uses_the_webhook_injected_agent(namespace, tmp_path):
    ns = namespace
    # Stage 1: the manager, and its webhook answering (a labelled dry-run pod gets the agent).
    tpenv(tmp_path, "manager", "uninstall", check=False)
    wait_for("no namespace tpenv", lambda: kubectl("get", "namespace", "tpenv", check=False).returncode != 0, 120)
    tpenv(tmp_path, "manager", "install", "--webhook-namespace", ns, timeout=300)
    try:
        kubectl("rollout", "status", "deployment/tpenv-manager", "--timeout=180s", ns="tpenv", timeout=200)
        probe = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "probe", "labels": {"tpenv.io/inject-agent": "enabled"}},
                 "spec": {"containers": [{"name": "app", "image": testapp_image(), "imagePullPolicy": "Never",
                                          "ports": [{"name": "http", "containerPort": 8080}]}]}}

        def webhook_injects() -> bool:
            cp = kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", ns=ns, input=json.dumps(probe))
            return "tpenv-agent" in [c["name"] for c in json.loads(cp.stdout)["spec"]["containers"]]

        wait_for("the webhook to inject a dry-run pod", webhook_injects, 120)

        # Stage 2: a workload that opts in by its pod template label; its pods carry the agent.
        apply([{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "gitops"},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "gitops"}},
                         "template": {"metadata": {"labels": {"app": "gitops", "tpenv.io/inject-agent": "enabled"}},
                                      "spec": {"containers": [echo_container("http")]}}}},
               {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "gitops"},
                "spec": {"selector": {"app": "gitops"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}],
              ns=ns)
        kubectl("rollout", "status", "deployment/gitops", "--timeout=180s", ns=ns, timeout=200)
        client_pod(ns)
        before = spec_of("deployment", "gitops", ns), spec_of("service", "gitops", ns)

        # Stage 3: intercept: no patch, no rollout; the laptop answers.
        local = LocalServer("laptop")
        run = Intercepting(tmp_path, "gitops", "--port", f"{local.port}:http", "--mount", "false", "-n", ns)
        try:
            run.ready()
            assert "Using the agent the webhook injected into deployment/gitops" in "".join(run.stderr)
            assert "Injecting" not in "".join(run.stderr)
            wait_for("the laptop's answer", lambda: curl(ns, f"http://gitops.{ns}/") == "laptop")
            assert (spec_of("deployment", "gitops", ns), spec_of("service", "gitops", ns)) == before
        finally:
            run.stop()
            local.close()
        wait_for("the cluster's answer",
                 lambda: json.loads(curl(ns, f"http://gitops.{ns}/"))["source"] == "cluster")
        assert kubectl_json("get", "deployment", "gitops", ns=ns)["metadata"].get("annotations", {}).get(
            "tpenv.io/restore") is None
    finally:
        tpenv(tmp_path, "manager", "uninstall", check=False)
