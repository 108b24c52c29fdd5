"""Scenario 5, failure: SIGKILL the tpenv process during an intercept.

Within the agent's lease the cluster's own answer comes back (nothing keeps pointing at a dead
laptop); then `tpenv uninstall --everything` leaves no tpenv object, label, annotation or
container behind, checked by listing every kind tpenv touches.
"""
from __future__ import annotations

import json
import signal
import time

import pytest

from test_intercept_kit import Intercepting, LocalServer, client_pod, curl, deploy_hello, spec_of, tpenv, wait_for
from tests.cluster.pytest_plugin import kubectl_json

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def source(ns: str) -> str:
    body = curl(ns, f"http://hello.{ns}/")
    return "laptop" if body == "from the laptop" else json.loads(body)["source"]


def tpenv_traces(ns: str) -> list[str]:
    """Every trace of tpenv in the namespace: objects, labels, annotations, containers, Secrets."""
    found = []
    for kind in ("deployments", "statefulsets", "replicasets", "controllerrevisions", "services", "pods", "secrets",
                 "configmaps", "serviceaccounts", "roles", "rolebindings"):
        for obj in kubectl_json("get", kind, ns=ns)["items"]:
            meta = obj["metadata"]
            name = f"{kind}/{meta['name']}"
            if meta.get("deletionTimestamp"):
                continue  # on its way out
            for k in list((meta.get("labels") or {})) + list((meta.get("annotations") or {})):
                if "tpenv" in k:
                    found.append(f"{name}: {k}")
            if (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") == "tpenv":
                found.append(f"{name}: managed by tpenv")
            if meta["name"].startswith("tpenv"):
                found.append(name)
            tpl = (obj.get("spec") or {}).get("template") or {}
            for c in ((tpl.get("spec") or obj.get("spec") or {}).get("containers") or []):
                if c.get("name") == "tpenv-agent":
                    found.append(f"{name}: container tpenv-agent")
            for k in ((tpl.get("metadata") or {}).get("labels") or {}):
                if "tpenv" in k:
                    found.append(f"{name}: template label {k}")
    return found


def test_sigkill_then_uninstall_everything(namespace, tmp_path):
    ns = namespace
    deploy_hello(ns)
    client_pod(ns)
    before = {"deployment": spec_of("deployment", "hello", ns), "service": spec_of("service", "hello", ns)}
    local = LocalServer("from the laptop")
    run = Intercepting(tmp_path, "hello", "--port", str(local.port), "--mount", "false", "-n", ns)
    try:
        # Stage 1: intercepted: the laptop answers.
        run.ready()
        wait_for("the laptop's answer (kube-proxy catching up)", lambda: source(ns) == "laptop")

        # Stage 2: kill -9 the tpenv process; the cluster answers again within the lease (5 s) + slack.
        run.kill(signal.SIGKILL)
        killed = time.monotonic()
        while True:
            try:
                if source(ns) == "cluster":
                    break
            except Exception:  # noqa: BLE001 - a refused/broken connection is not the cluster's answer yet
                pass
            assert time.monotonic() - killed < 20, "traffic still goes to the dead laptop"
            time.sleep(0.5)
        print(f"cluster answers again {time.monotonic() - killed:.1f}s after SIGKILL")
        assert local.server  # the local server is still up: the answer really came from the cluster
    finally:
        run.stop()
        local.close()

    # Stage 3: uninstall --everything; no trace of tpenv left; the specs are the originals.
    assert tpenv_traces(ns), "the intercept should have left the agent installed until uninstall"
    tpenv(tmp_path, "uninstall", "--everything")
    assert tpenv_traces(ns) == []
    assert spec_of("deployment", "hello", ns) == before["deployment"]
    assert spec_of("service", "hello", ns) == before["service"]
    # The restored Service and the rollout back reach kube-proxy a moment later (no event for it).
    wait_for("the cluster's answer after uninstall", lambda: source(ns) == "cluster")
