"""The sweep: `tpenv uninstall --all-agents` repairs a Service a GitOps revert left on `tpenv-<n>`.

hello's Service has a numeric targetPort; in a namespace whose Pod Security forbids the in-pod
redirect (baseline here) an intercept rewrites it to the agent's named port `tpenv-8080`. Argo CD / Flux with "replace" then put the Deployment back from Git (no agent, no
tpenv annotations) and leave the Service alone: every request to it fails, and no workload says
tpenv was ever there. `uninstall --all-agents` must still find and repair that Service (the same
code as `doctor --fix`, tpenv.engine.strayports), and leave alone a Service naming a port that is
not tpenv's.
"""
from __future__ import annotations

import json

import pytest

from test_intercept_kit import Intercepting, LocalServer, client_pod, curl, deploy_hello, tpenv, wait_for
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_uninstall_all_agents_repairs_a_service_left_on_a_tpenv_port(namespace, tmp_path):
    ns = namespace
    state = tmp_path / "state"
    state.mkdir()
    kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=baseline", "--overwrite")
    deploy_hello(ns)
    client_pod(ns)
    original = kubectl_json("get", "deployment", "hello", ns=ns)

    # Stage 1: an intercept (then a clean leave): the Service now targets the agent's tpenv-8080.
    local = LocalServer("laptop")
    run = Intercepting(state, "hello", "--port", str(local.port), "--mount", "false", "-n", ns)
    try:
        run.ready()
        assert kubectl_json("get", "service", "hello", ns=ns)["spec"]["ports"][0]["targetPort"] == "tpenv-8080"
    finally:
        assert run.stop() == 0, "".join(run.stderr)
        local.close()

    # Stage 2: the GitOps revert: the Deployment replaced by its Git version (the same spec it had
    # before tpenv, without any annotation of tpenv's); the Service is left on tpenv-8080.
    reverted = {k: original[k] for k in ("apiVersion", "kind", "spec")}
    reverted["metadata"] = {"name": "hello", "namespace": ns, "labels": original["metadata"].get("labels") or {}}
    path = tmp_path / "reverted.json"
    path.write_text(json.dumps(reverted))
    kubectl("replace", "-f", str(path), ns=ns)
    kubectl("rollout", "status", "deployment/hello", "--timeout=180s", ns=ns, timeout=200)
    assert kubectl_json("get", "service", "hello", ns=ns)["spec"]["ports"][0]["targetPort"] == "tpenv-8080"
    assert not any(c["name"] == "tpenv-agent" for c in kubectl_json("get", "deployment", "hello", ns=ns)
                   ["spec"]["template"]["spec"]["containers"])

    # A Service naming a port that is not tpenv's (a user's mistake): reported by doctor, never
    # guessed at by the sweep.
    apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "foreign"},
           "spec": {"selector": {"app": "hello"}, "ports": [{"port": 80, "targetPort": "metrics"}]}}, ns=ns)

    # Stage 3: the sweep repairs hello (from tpenv's restore record: the original number) and says so.
    cp = tpenv(state, "-o", "json", "uninstall", "--all-agents", "-n", ns, timeout=400)
    done = json.loads(cp.stdout)
    assert any("service/hello" in line and "tpenv-8080" in line for line in done["services"]), done
    assert kubectl_json("get", "service", "hello", ns=ns)["spec"]["ports"][0]["targetPort"] == 8080
    assert kubectl_json("get", "service", "foreign", ns=ns)["spec"]["ports"][0]["targetPort"] == "metrics"
    wait_for("hello to answer through its Service again", lambda: "source" in curl(ns, f"http://hello.{ns}/"),
             timeout=60)

    # Stage 4: a second sweep finds nothing to do (idempotent).
    done = json.loads(tpenv(state, "-o", "json", "uninstall", "--all-agents", "-n", ns, timeout=400).stdout)
    assert not done["services"], done
