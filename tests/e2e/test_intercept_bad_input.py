"""Scenario 6, bad input: one-line errors that say what to do, and the cluster left unchanged.

Unknown workload, a port the Service does not expose, a missing namespace, a user whose
RBAC lets them read but not patch the Deployment (a real ServiceAccount token), and a workload
that opts out of the agent.
"""
from __future__ import annotations

import json

import pytest

from test_intercept_kit import deploy_hello, spec_of, tpenv
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def error_lines(cp) -> list[str]:
    return [line for line in cp.stderr.splitlines() if line.startswith(("tpenv: error:", "hint:"))]


def test_bad_input_fails_with_one_line_and_changes_nothing(namespace, tmp_path):
    ns = namespace
    deploy_hello(ns)
    before = {"deployment": spec_of("deployment", "hello", ns), "service": spec_of("service", "hello", ns)}

    # Stage 1: an unknown workload.
    cp = tpenv(tmp_path, "intercept", "nosuch", "--port", "8080", "-n", ns, check=False)
    assert cp.returncode == 1
    assert error_lines(cp)[0] == f"tpenv: error: no workload 'nosuch' in namespace '{ns}' " \
                                 f"(looked for deployments/statefulsets/replicasets)"
    assert error_lines(cp)[1].startswith("hint: list them with: kubectl get")

    # Stage 2: a port the Service does not expose (by number, by name).
    for remote in ("81", "http"):
        cp = tpenv(tmp_path, "intercept", "hello", "--port", f"8080:{remote}", "-n", ns, check=False)
        assert cp.returncode == 1
        remote_text = remote if remote == "http" else int(remote)
        assert error_lines(cp)[0] == f"tpenv: error: Service 'hello' exposes no port {remote_text!r} (its ports: -=80)"

    # Stage 3: a namespace that does not exist.
    cp = tpenv(tmp_path, "intercept", "hello", "--port", "8080", "-n", "no-such-ns-x1", check=False)
    assert cp.returncode == 1
    assert error_lines(cp)[0] == "tpenv: error: namespace 'no-such-ns-x1' does not exist"

    # Stage 4: a user who may read but not update Deployments.
    apply([{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
           {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "reader"},
            "rules": [{"apiGroups": ["apps"], "resources": ["deployments", "statefulsets", "replicasets"],
                       "verbs": ["get", "list", "watch"]},
                      {"apiGroups": [""], "resources": ["services", "pods", "secrets"],
                       "verbs": ["get", "list", "watch"]}]},
           {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]}], ns=ns)
    token = kubectl("create", "token", "reader", ns=ns).stdout.strip()
    admin = kubectl_json("config", "view", "--raw", "--minify")
    cluster = admin["clusters"][0]
    limited = {"apiVersion": "v1", "kind": "Config", "current-context": "reader",
               "clusters": [cluster], "users": [{"name": "reader", "user": {"token": token}}],
               "contexts": [{"name": "reader", "context": {"cluster": cluster["name"], "user": "reader",
                                                           "namespace": ns}}]}
    kc = tmp_path / "reader.kubeconfig"
    kc.write_text(json.dumps(limited))
    cp = tpenv(tmp_path, "intercept", "hello", "--port", "8080", check=False, env={"KUBECONFIG": str(kc)})
    assert cp.returncode == 1, cp.stderr
    lines = error_lines(cp)
    assert lines[0].startswith(f"tpenv: error: forbidden: cannot update deployments 'hello' in namespace '{ns}'")
    assert lines[1] == f"hint: check your rights with: kubectl auth can-i update deployments -n {ns}"

    # Stage 5: nothing changed in the cluster.
    assert spec_of("deployment", "hello", ns) == before["deployment"]
    assert spec_of("service", "hello", ns) == before["service"]
    assert kubectl("get", "secret", "tpenv-auth", ns=ns, check=False).returncode != 0

    # Stage 6: a workload whose owner opted it out (Telepresence's annotation on the pod template,
    # as charts set it): refused, naming the annotation, and left as it is.
    key = "telepresence.getambassador.io/inject-traffic-agent"
    kubectl("patch", "deployment", "hello", "--type", "merge", "-p",
            json.dumps({"spec": {"template": {"metadata": {"annotations": {key: "disabled"}}}}}), ns=ns)
    opted_out = spec_of("deployment", "hello", ns)
    cp = tpenv(tmp_path, "intercept", "hello", "--port", "8080", "--mount", "false", "-n", ns, check=False)
    assert cp.returncode == 1, cp.stderr
    line = error_lines(cp)[0]
    assert line.startswith("tpenv: error: cannot inject the agent into Deployment/hello: "), line
    assert line.endswith(f"opts out of the agent (its pod template's annotation {key}: disabled); remove that, "
                         f"or set it to enabled, to intercept it"), line
    assert spec_of("deployment", "hello", ns) == opted_out
    assert kubectl("get", "secret", "tpenv-auth", ns=ns, check=False).returncode != 0


def test_stalled_rollout_names_the_cause_and_restores(namespace, tmp_path):
    ns = namespace
    deploy_hello(ns)
    before = spec_of("deployment", "hello", ns)
    # Stage 1: an agent image the node does not have (pull policy Never): the rollout stalls at once.
    cp = tpenv(tmp_path, "intercept", "hello", "--port", "8080", "--mount", "false", "-n", ns, check=False,
               env={"TPENV_AGENT_IMAGE": "tpenv/agent:no-such-tag"}, timeout=240)
    assert cp.returncode == 1, cp.stderr
    line = error_lines(cp)[0]
    assert line.startswith("tpenv: error: the rollout of deployment/hello stalled: image pull failed")
    assert "tpenv/agent:no-such-tag" in line and line.endswith("deployment/hello was restored as it was")
    # Stage 2: the workload is back as it was.
    assert spec_of("deployment", "hello", ns) == before


def test_second_all_tcp_intercept_is_a_conflict_naming_the_holder(namespace, tmp_path):
    from test_intercept_kit import Intercepting, LocalServer

    ns = namespace
    deploy_hello(ns)
    local = LocalServer("first")
    first = Intercepting(tmp_path, "hello", "--port", str(local.port), "--mount", "false", "-n", ns)
    try:
        holder = first.ready()["id"]
        cp = tpenv(tmp_path, "intercept", "hello", "--name", "other", "--port", "9", "--mount", "false", "-n", ns,
                   check=False)
        assert cp.returncode == 1
        line = error_lines(cp)[0]
        assert line.startswith("tpenv: error: agent: port tpenv-8080 is already intercepted") and holder in line
    finally:
        first.stop()
        local.close()
