"""`connect.context` (issue 20): the connection of `tpenv up` is made in the context it names, with
that context's credentials. The reader's kubeconfig and the limited ServiceAccount are
tests/e2e/test_up_contexts.py's: ``team`` (candidate name ``my-sa``) may read and port-forward in
its namespace B alone.

Cluster-wide (manager install: the relay): run under flock /tmp/tpenv-clusterwide.lock.
"""
from __future__ import annotations

import json
import time

import pytest

from connect_kit import curl, manager  # noqa: F401  (module fixture)
from test_webhook_injection import agent_image, cli_env  # noqa: F401  (module fixtures, reused)
from tests.cluster.pytest_plugin import apply, kubectl
from tests.e2e.test_up_contexts import SA, file_with, two_contexts
from tests.e2e.test_up_kit import UpSession, ready_pods

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def relay_right(ns_sa: str) -> str:
    """Role tpenv-relay-client (the manager's) for the limited ServiceAccount; the binding's name."""
    name = f"relay-{ns_sa}"
    apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
           "metadata": {"name": name, "namespace": "tpenv"},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tpenv-relay-client"},
           "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": ns_sa}]})
    return name


def test_the_connection_is_made_in_its_context_with_its_credentials(manager, namespace, kubeconfig, tmp_path):
    ns = namespace
    with two_contexts(tmp_path, kubeconfig, ns) as c:
        ns_sa = c["ns_sa"]
        kubectl("rollout", "status", "deployment/db", "--timeout=120s", ns=ns_sa, timeout=150)
        # -- stage 1: the connection names team (the default is cluster, the admin): ------------
        file_with(tmp_path, c["server"], "connect:\n  mode: env\n  context: team\n")
        binding = None
        try:
            with UpSession(tmp_path, env={"KUBECONFIG": str(c["kubeconfig"])}) as up:
                # -- stage 2: without the relay's Role, the ServiceAccount is refused, by name: the
                # connection asked with team's token, not the admin's (who may do anything) -------
                key = f"connect/{ns_sa}/team"
                refused = up.until("the connection refused to the ServiceAccount", lambda: (
                    lambda u: u if u and u.get("last_error") else None)(up.unit(key)), 120)
                assert f"system:serviceaccount:{ns_sa}:{SA}" in refused["last_error"], refused
                assert refused["context"] == "team"

                # -- stage 3: the Role is granted: the connection comes up by itself -----------------
                binding = relay_right(ns_sa)
                t0 = time.monotonic()
                up.wait_ready(key, timeout=180)
                print(f"connected {time.monotonic() - t0:.1f}s after the grant")
                connection = up.until("the connection's proxy in status",
                                      lambda: (lambda s: s if s.get("proxy") else None)(up.status().get("connection")
                                                                                         or {}), 60)
                assert connection["context"] == "team" and connection["namespace"] == ns_sa, connection
                text = up.tpenv("status")
                assert text.returncode == 0 and "connection: context team" in text.stdout, text.stdout

                # -- stage 4: team's namespace B by its short name, through the session's proxy ------
                def db() -> dict | None:
                    cp = curl("-x", f"socks5h://{connection['proxy']}", "http://db/from-laptop")
                    return json.loads(cp.stdout) if cp.returncode == 0 and cp.stdout.startswith("{") else None

                answer = up.until("db through the team connection", db, 90)
                assert answer["path"] == "/from-laptop" and answer["pod"] in ready_pods(ns_sa, "db"), answer
                assert up.stop() == 0, up.output
        finally:
            if binding:
                kubectl("delete", "rolebinding", binding, ns="tpenv", check=False)
