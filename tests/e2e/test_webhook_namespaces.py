"""Issue 12: the webhook injects only in the namespaces an admin selected, and the manager may
create Secrets only there. Each point tried for real against the local cluster:

1. `manager install --webhook-namespace kube-system` (and tpenv, and a namespace that does not
   exist) is refused, naming the flag, and creates nothing;
2. installed with one namespace selected: an opted-in Deployment there gets the agent and runs;
   the same Deployment in a namespace NOT selected runs without the agent, and no Secret
   tpenv-auth appears there;
3. the manager's ServiceAccount may create Secrets in the selected namespace and not in the
   other (`kubectl auth can-i`, the API server's own RBAC decision);
4. `upgrade --webhook-namespace kube-system` on the running install is refused and changes
   nothing (ConfigMap and webhook configuration keep their resourceVersion);
5. `tpenv status` in the unselected namespace warns that it is not selected;
6. `manager uninstall` removes the Role it put into the selected namespace.

Cluster-wide (installs the manager): run under the lock,
flock /tmp/tpenv-clusterwide.lock .venv/bin/python -m pytest tests/e2e/test_webhook_namespaces.py
"""
from __future__ import annotations

import json
import random
import string

import pytest

from test_security_webhook import app, has_agent
from test_webhook_injection import agent_image, cli_env  # noqa: F401  (module fixtures)
from test_webhook_injection import tpenv as tpenv_cli
from tests.cluster.pytest_plugin import TEST_LABEL, apply, kubectl, kubectl_json, live_pods, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

MANAGER_SA = "system:serviceaccount:tpenv:tpenv-manager"


@pytest.fixture
def other_namespace(kubeconfig) -> str:
    """A second namespace, never selected."""
    name = "t-unselected-" + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
    apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {TEST_LABEL: "true"}}})
    wait_until(f"ServiceAccount default in {name}",
               lambda: kubectl("get", "serviceaccount", "default", ns=name, check=False).returncode == 0, 60)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


def nothing_installed() -> bool:
    return (kubectl("get", "namespace", "tpenv", check=False).returncode != 0
            and kubectl("get", "mutatingwebhookconfiguration", "tpenv-agent-injector", check=False).returncode != 0
            and kubectl("get", "clusterrole", "tpenv-manager", check=False).returncode != 0)


def can_create_secrets(ns: str) -> bool:
    cp = kubectl("auth", "can-i", "create", "secrets", f"--as={MANAGER_SA}", ns=ns, check=False)
    return cp.stdout.strip() == "yes"


def running_pod(ns: str) -> dict | None:
    pods = live_pods(ns, "app=shop")
    return pods[0] if len(pods) == 1 and pods[0]["status"].get("phase") == "Running" else None


def test_only_selected_namespaces_are_injected(cli_env, namespace, other_namespace):  # noqa: F811
    selected, other = namespace, other_namespace
    tpenv_cli("manager", "uninstall", env=cli_env)
    wait_until("no manager left over", nothing_installed, 180)

    # Stage 1: the control plane's namespaces, tpenv's own and a missing one are refused; nothing made.
    for ns, says in (("kube-system", "never injected"), ("tpenv", "never injected"),
                     ("t-no-such-namespace", "does not exist")):
        cp = tpenv_cli("manager", "install", "--webhook-namespace", selected, "--webhook-namespace", ns, env=cli_env)
        assert cp.returncode != 0, cp.stdout
        assert "--webhook-namespace" in cp.stderr and ns in cp.stderr and says in cp.stderr, cp.stderr
        assert nothing_installed(), f"install --webhook-namespace {ns} left objects behind"

    # Stage 2: installed with one namespace selected; the same opted-in app in both namespaces.
    cp = tpenv_cli("manager", "install", "--webhook-namespace", selected, env=cli_env)
    assert cp.returncode == 0, cp.stderr
    try:
        assert "the webhook answers" in cp.stdout and selected in cp.stdout, cp.stdout
        hooks = kubectl_json("get", "mutatingwebhookconfiguration", "tpenv-agent-injector")["webhooks"]
        for hook in hooks:
            assert hook["namespaceSelector"]["matchExpressions"] == [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [selected]}], hook
        apply(app(), ns=selected)
        apply(app(), ns=other)
        for ns in (selected, other):
            kubectl("rollout", "status", "deployment/shop", "--timeout=240s", ns=ns, timeout=260)
        pod = wait_until("shop running in the selected namespace", lambda: running_pod(selected), 120)
        assert has_agent(pod), pod["spec"]["containers"]
        assert kubectl("get", "secret", "tpenv-auth", ns=selected, check=False).returncode == 0
        pod = wait_until("shop running in the other namespace", lambda: running_pod(other), 120)
        assert not has_agent(pod), pod["spec"]["containers"]
        assert kubectl("get", "secret", "tpenv-auth", ns=other, check=False).returncode != 0

        # Stage 3: the manager may create Secrets where selected (and in its own namespace), not elsewhere.
        assert can_create_secrets(selected) and can_create_secrets("tpenv")
        assert not can_create_secrets(other) and not can_create_secrets("kube-system")
        assert not can_create_secrets("default")

        # Stage 4: an upgrade asking for kube-system is refused and changes nothing.
        def versions() -> tuple[str, str]:
            return (kubectl_json("get", "configmap", "tpenv-manager", ns="tpenv")["metadata"]["resourceVersion"],
                    kubectl_json("get", "mutatingwebhookconfiguration",
                                 "tpenv-agent-injector")["metadata"]["resourceVersion"])
        before = versions()
        cp = tpenv_cli("manager", "upgrade", "--webhook-namespace", "kube-system", env=cli_env)
        assert cp.returncode == 2 and "--webhook-namespace" in cp.stderr and "kube-system" in cp.stderr, cp.stderr
        assert versions() == before
        assert kubectl("get", "role", "tpenv-manager-auth", ns="kube-system", check=False).returncode != 0

        # Stage 5: `tpenv status` in the unselected namespace says so (no session running: exit 1).
        cp = tpenv_cli("-o", "json", "status", "-n", other, env=cli_env)
        warnings = {w["name"]: w for w in json.loads(cp.stdout)["warnings"]}
        assert "not selected for injection" in warnings["cluster/webhook"]["detail"], warnings
        assert warnings["cluster/webhook"]["fix"].startswith(f"tpenv manager upgrade --webhook-namespace {other}")
    finally:
        # Stage 6: uninstall takes the Role out of the selected namespace too.
        cp = tpenv_cli("manager", "uninstall", env=cli_env)
    assert cp.returncode == 0, cp.stderr
    assert f"Role/tpenv-manager-auth -n {selected}" in cp.stdout, cp.stdout
    assert kubectl("get", "role,rolebinding", "-l", "app.kubernetes.io/component=webhook-auth", "-A",
                   "-o", "name").stdout.strip() == ""
