"""What the issue-12 tests share: cluster users that are really someone else.

``user_kubeconfig`` makes a ServiceAccount, binds it to a Role that lets a developer use tpenv
in one namespace (patch mode: workloads, Services, pods, port-forward, the tpenv-auth Secret),
asks the API server for a token, and writes a kubeconfig that authenticates with that bearer
token only (the admin's client certificate left out). Two of them are two users with the same
rights, told apart by the cluster, not by anything they claim.
"""
from __future__ import annotations

import json
from pathlib import Path

from tests.cluster.pytest_plugin import apply, kubectl

# A developer's rights in a namespace; the same Role for every test user, so only the identity
# tells them apart.
DEV_RULES = [
    {"apiGroups": [""], "resources": ["pods", "pods/portforward", "pods/log", "services", "secrets", "configmaps",
                                      "events", "endpoints"], "verbs": ["*"]},
    {"apiGroups": ["apps"], "resources": ["deployments", "replicasets", "statefulsets", "controllerrevisions"],
     "verbs": ["*"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
]


def dev_role(ns: str) -> None:
    apply([{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "tpenv-dev"}, "rules": DEV_RULES}], ns=ns)


def user_kubeconfig(ns: str, user: str, admin_kubeconfig: Path, out_dir: Path) -> tuple[Path, str]:
    """(kubeconfig path, bearer token) for ServiceAccount ``user`` in ``ns`` with Role tpenv-dev."""
    dev_role(ns)
    apply([{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": user}},
           {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": f"dev-{user}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tpenv-dev"},
            "subjects": [{"kind": "ServiceAccount", "name": user, "namespace": ns}]}], ns=ns)
    token = kubectl("create", "token", user, "--duration=2h", ns=ns).stdout.strip()
    admin = json.loads(kubectl("config", "view", "--raw", "--flatten", "-o", "json",
                               f"--kubeconfig={admin_kubeconfig}").stdout)
    ctx = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = next(c for c in admin["clusters"] if c["name"] == ctx["cluster"])
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": user,
           "clusters": [cluster],
           "contexts": [{"name": user, "context": {"cluster": cluster["name"], "user": user, "namespace": ns}}],
           "users": [{"name": user, "user": {"token": token}}]}
    path = out_dir / f"kubeconfig-{user}"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path, token
