"""tpenv doctor and the manager: installed and healthy (webhook injecting, DNS through the relay),
then scaled to 0: doctor names it with the kubectl line that brings it back, which does.

Cluster-wide (installs the manager): run under the lock,
flock /tmp/tpenv-clusterwide.lock .venv/bin/python -m pytest tests/e2e/test_doctor_manager.py
"""
from __future__ import annotations

import shlex

import pytest

from test_doctor import check, doctor, failures
from test_intercept_kit import deploy_hello, tpenv, wait_for
from tests.cluster.pytest_plugin import kubectl, kubectl_json

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def ready_managers() -> int:
    return kubectl_json("get", "deployment", "tpenv-manager", ns="tpenv").get("status", {}).get("readyReplicas") or 0


def test_doctor_names_a_manager_scaled_to_zero(namespace, tmp_path):
    ns = namespace
    deploy_hello(ns)
    # Stage 1: a fresh manager, ready.
    tpenv(tmp_path, "manager", "uninstall", check=False)
    wait_for("no namespace tpenv", lambda: kubectl("get", "namespace", "tpenv", check=False).returncode != 0, 120)
    tpenv(tmp_path, "manager", "install", "--webhook-namespace", ns, timeout=300)
    try:
        kubectl("rollout", "status", "deployment/tpenv-manager", "--timeout=180s", ns="tpenv", timeout=200)

        # Stage 2: healthy: the webhook injects a dry-run pod, the relay resolves a cluster name.
        # (The webhook's Service endpoints follow readiness a moment later: wait for doctor's own verdict.)
        report = wait_for("doctor to pass with the manager installed",
                          lambda: (lambda r: r if r[0] == 0 else None)(doctor(tmp_path, ns)), timeout=120)[1]
        assert check(report, "cluster/manager")["status"] == "ok"
        assert "dry-run injection works" in check(report, "cluster/webhook")["detail"]
        dns = check(report, "e2e/dns")
        assert dns["status"] == "ok" and "kubernetes.default.svc ->" in dns["detail"], dns

        # Stage 3: scaled to 0: named, with its fix; the webhook's failure is reported too.
        kubectl("scale", "deployment/tpenv-manager", "--replicas=0", ns="tpenv")
        wait_for("the manager pods to go", lambda: not kubectl_json(
            "get", "pods", "-l", "app.kubernetes.io/name=tpenv-manager", ns="tpenv")["items"], timeout=120)
        code, report = doctor(tmp_path, ns)
        assert code == 1 and "cluster/manager" in failures(report)
        manager = check(report, "cluster/manager")
        assert "scaled to 0" in manager["detail"]
        assert manager["fix"] == "kubectl -n tpenv scale deployment/tpenv-manager --replicas=1"
        assert check(report, "cluster/webhook")["status"] == "fail"

        # Stage 4: the fix as printed brings it back; doctor passes again.
        kubectl(*shlex.split(manager["fix"])[1:])
        kubectl("rollout", "status", "deployment/tpenv-manager", "--timeout=180s", ns="tpenv", timeout=200)
        wait_for("doctor to pass again", lambda: doctor(tmp_path, ns)[0] == 0, timeout=120)
    finally:
        tpenv(tmp_path, "manager", "uninstall", check=False)
