"""Issue #11: the env is what the app process sees, its image's ENV included.

The testapp image sets ``ENV PATH=... LANG=C.UTF-8 PYTHONUNBUFFERED=1`` (tests/cluster/images.py
BASE_ENV). The pod spec never names PATH or PYTHONUNBUFFERED and overrides LANG. The agent's image
sets the same names, so the agent alone cannot report them (protocol.md §5): they come from the
app container itself (``pods/exec``, tpenv.engine.appenv). A user without ``pods/exec`` gets the
agent's report and a warning naming the right and what is missing.
"""
from __future__ import annotations

import json

import pytest

from test_intercept_kit import Intercepting, tpenv
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, live_pods
from tests.kit.apps import testapp_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def imaged_app(ns: str) -> str:
    apply([
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "imaged"},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "imaged"}},
                  "template": {"metadata": {"labels": {"app": "imaged"}}, "spec": {
                      "containers": [{
                          "name": "app", "image": testapp_image(), "imagePullPolicy": "Never",
                          "command": ["tpenv-echo"], "ports": [{"containerPort": 8080, "name": "http"}],
                          "env": [{"name": "GREETING", "value": "hello"}, {"name": "LANG", "value": "C"}],
                          "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "imaged"},
         "spec": {"selector": {"app": "imaged"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}},
    ], ns=ns)
    kubectl("rollout", "status", "deployment/imaged", "--timeout=120s", ns=ns, timeout=150)


def process_env(ns: str) -> dict[str, str]:
    """What the app process sees, read by hand in its container."""
    pods = live_pods(ns, "app=imaged")
    raw = kubectl("exec", pods[0]["metadata"]["name"], "-c", "app", "--", "cat", "/proc/1/environ", ns=ns).stdout
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def limited_kubeconfig(ns: str, tmp_path) -> dict[str, str]:
    """A real ServiceAccount with what an intercept of an injected workload needs, but not pods/exec."""
    apply([{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "noexec"}},
           {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "noexec"},
            "rules": [{"apiGroups": ["apps"], "resources": ["deployments", "replicasets", "statefulsets"],
                       "verbs": ["get", "list", "watch", "update", "patch"]},
                      {"apiGroups": [""], "resources": ["services", "pods", "secrets"],
                       "verbs": ["get", "list", "watch"]},
                      {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                       "verbs": ["get", "list", "watch"]},
                      {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]}]},
           {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "noexec"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "noexec"},
            "subjects": [{"kind": "ServiceAccount", "name": "noexec", "namespace": ns}]}], ns=ns)
    token = kubectl("create", "token", "noexec", ns=ns).stdout.strip()
    cluster = kubectl_json("config", "view", "--raw", "--minify")["clusters"][0]
    kc = tmp_path / "noexec.kubeconfig"
    kc.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "noexec", "clusters": [cluster],
        "users": [{"name": "noexec", "user": {"token": token}}],
        "contexts": [{"name": "noexec", "context": {"cluster": cluster["name"], "user": "noexec", "namespace": ns}}]}))
    return {"KUBECONFIG": str(kc)}


def test_env_has_the_image_env_and_tpenv_env_works_without_a_file(namespace, tmp_path):
    ns = namespace
    imaged_app(ns)

    # Stage 1: an intercept from the command line (no telepresence.yaml anywhere), env file in JSON.
    run = Intercepting(tmp_path, "imaged", "--port", "18383:web", "-n", ns, "--mount", "false",
                       "--env-file", "imaged.env", "--env-syntax", "json")
    try:
        desc = run.ready()
        assert desc["name"] == "imaged"
        env_file = json.loads((tmp_path / "imaged.env").read_text())

        # Stage 2: every variable the app process has is in the env file with the same value: the
        # image's ENV (PATH, PYTHONUNBUFFERED), the pod spec's override of it (LANG), the spec's own.
        seen = process_env(ns)
        assert {k: env_file.get(k) for k in seen} == seen, "".join(run.stderr)
        assert env_file["PATH"] == IMAGE_PATH
        assert env_file["PYTHONUNBUFFERED"] == "1"
        assert env_file["LANG"] == "C" and env_file["GREETING"] == "hello"
        # ... and nothing of the agent's own image leaks in.
        assert "PYTHONDONTWRITEBYTECODE" not in env_file
        assert not any("no right to exec" in line for line in run.stderr)

        # Stage 3: `tpenv env NAME` finds the running intercept without any config file.
        assert not (tmp_path / "telepresence.yaml").exists()
        printed = json.loads(tpenv(tmp_path, "-o", "json", "env", "imaged").stdout)
        assert printed == env_file
    finally:
        assert run.stop() == 0, "".join(run.stderr)

    # Stage 4: with no intercept running and no file, `tpenv env` says both.
    cp = tpenv(tmp_path, "env", "imaged", check=False)
    assert cp.returncode == 1
    assert "no running intercept named 'imaged' on this machine" in cp.stderr

    # Stage 5: a user without pods/exec: the agent's report alone, and a warning naming the right
    # and what is missing (the agent is injected already, so this user needs no rollout).
    (tmp_path / "limited").mkdir()
    cp = tpenv(tmp_path / "limited", "intercept", "imaged", "--port", "18384:web", "-n", ns, "--mount", "false",
               "--env-file", "limited.env", "--env-syntax", "json", "--", "true",
               env=limited_kubeconfig(ns, tmp_path), timeout=300)
    limited = json.loads((tmp_path / "limited" / "limited.env").read_text())
    assert f"create pods/exec in namespace {ns}" in cp.stderr, cp.stderr
    assert "ENV in its Dockerfile" in cp.stderr
    assert limited["GREETING"] == "hello" and "PYTHONUNBUFFERED" not in limited
