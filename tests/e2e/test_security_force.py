"""`--force`: ending or taking over another user's intercept, backed by an RBAC right.

Two developers with the same Role (security_kit): alice holds an all-TCP intercept of backend.
Bob, without the right, tries `tpenv leave --force` and `tpenv intercept --force`: both refused
with a message naming him and the missing right (verb force on intercepts.tpenv.io), alice's
intercept untouched. An admin then grants bob that verb (a Role of its own, a RoleBinding):
`leave --force` ends alice's intercept (the app answers again), and after alice intercepts
anew, `intercept --force` takes the port from her (bob's laptop answers).

The check is the agent's (a SelfSubjectAccessReview with bob's own token), never the client's.
"""
from __future__ import annotations

import json

import pytest

from security_kit import user_kubeconfig
from test_intercept_kit import Intercepting, client_pod, curl, tpenv, wait_for
from test_intercept_personal import LocalEcho, deploy, who
from tests.cluster.pytest_plugin import apply

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

RIGHT = "may not force intercepts.tpenv.io"


def grant_force(ns: str, user: str) -> None:
    apply([{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "tpenv-force"},
            "rules": [{"apiGroups": ["tpenv.io"], "resources": ["intercepts"], "verbs": ["force"]}]},
           {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": f"force-{user}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tpenv-force"},
            "subjects": [{"kind": "ServiceAccount", "name": user, "namespace": ns}]}], ns=ns)


def test_force_needs_the_right_and_with_it_ends_or_takes_another_users_intercept(namespace, tmp_path, kubeconfig):
    ns = namespace
    deploy(ns)
    client_pod(ns)
    alice_config, _ = user_kubeconfig(ns, "alice", kubeconfig, tmp_path)
    bob_config, _ = user_kubeconfig(ns, "bob", kubeconfig, tmp_path)
    bob_user = f"system:serviceaccount:{ns}:bob"
    alice, bob = LocalEcho("laptop-alice"), LocalEcho("laptop-bob")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    as_alice, as_bob = {"KUBECONFIG": str(alice_config)}, {"KUBECONFIG": str(bob_config)}
    a = b = None
    try:
        # Stage 1: alice's all-TCP intercept.
        a = Intercepting(tmp_path / "a", "backend", "--port", f"{alice.port}:http", "--mount", "false", "-n", ns,
                         env=as_alice)
        alice_id = a.ready()["id"]
        wait_for("alice's laptop to answer", lambda: who(curl(ns, f"http://backend.{ns}/")) == "laptop-alice", 60)

        # Stage 2: bob without the right: leave --force and intercept --force refused, naming the right.
        cp = tpenv(tmp_path / "b", "leave", "--force", alice_id, "-n", ns, env=as_bob, check=False, timeout=300)
        assert cp.returncode != 0 and RIGHT in cp.stderr and bob_user in cp.stderr, cp.stderr
        cp = tpenv(tmp_path / "b", "intercept", "backend", "--force", "--name", "takeover", "--port",
                   f"{bob.port}:http", "--mount", "false", "-n", ns, "--", "true", env=as_bob, check=False,
                   timeout=300)
        assert cp.returncode != 0 and RIGHT in cp.stderr, cp.stderr
        assert who(curl(ns, f"http://backend.{ns}/")) == "laptop-alice"

        # Stage 3: granted the right, bob ends alice's intercept: the app answers again.
        grant_force(ns, "bob")
        cp = tpenv(tmp_path / "b", "-o", "json", "leave", "--force", alice_id, "-n", ns, env=as_bob, timeout=300)
        assert json.loads(cp.stdout)["left"] == alice_id, cp.stdout
        wait_for("the app to answer again", lambda: who(curl(ns, f"http://backend.{ns}/")).startswith("backend-"),
                 60)
        listed = tpenv(tmp_path / "b", "list", "-n", ns, env=as_bob).stdout
        assert alice_id not in listed, listed

        # Stage 4: alice intercepts again; bob takes the port over with intercept --force.
        assert a.stop() == 0
        a = Intercepting(tmp_path / "a", "backend", "--port", f"{alice.port}:http", "--mount", "false", "-n", ns,
                         env=as_alice)
        a.ready()
        wait_for("alice's laptop to answer", lambda: who(curl(ns, f"http://backend.{ns}/")) == "laptop-alice", 60)
        b = Intercepting(tmp_path / "b", "backend", "--force", "--name", "takeover", "--port", f"{bob.port}:http",
                         "--mount", "false", "-n", ns, env=as_bob)
        b.ready()
        wait_for("bob's laptop to answer", lambda: who(curl(ns, f"http://backend.{ns}/")) == "laptop-bob", 60)
        listed = tpenv(tmp_path / "b", "list", "-n", ns, env=as_bob).stdout
        assert f"Owner         : {bob_user}" in listed and f"{ns}:alice" not in listed, listed
    finally:
        for run in (b, a):
            if run is not None:
                run.stop()
        alice.close()
        bob.close()
