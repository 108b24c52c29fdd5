"""Issue 12, Done-when 5: `uninstall --everything` removes what tpenv made, and only that.

Cluster-wide (the manager's install): run under `flock /tmp/tpenv-clusterwide.lock`.

Before install, an admin already has namespace `tpenv` with their own RoleBinding in it. A
StatefulSet with a `partition` runs pods on the agent's revision (patch mode) and keeps them
there. After `tpenv uninstall --everything`: the namespace and the RoleBinding are still there
(the install only adopted the namespace: the uninstall gives it back), the objects the install
created are gone, and the ControllerRevision the StatefulSet's pods still run is kept. A replace
whose client and agent both died leaves its restore right (ServiceAccount, Role, RoleBinding,
Secret tpenv-restore-<workload>, exactly as templates/replace/restore.yaml.j2 makes them): the
sweep removes them, and a same-named ServiceAccount without tpenv's labels stays.
"""
from __future__ import annotations

import pytest

from test_intercept_kit import tpenv
from tpenv.engine.replace import render_restore
from tpenv.kits.kube import Workload
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, wait_until
from tests.kit.apps import testapp_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ADMIN_BINDING = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                 "metadata": {"name": "team-readers", "namespace": "tpenv"},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
                 "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "team"}]}


def statefulset(ns: str) -> None:
    apply([
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
         "spec": {"serviceName": "db-pods", "replicas": 2, "selector": {"matchLabels": {"app": "db"}},
                  "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
                  "template": {"metadata": {"labels": {"app": "db"}}, "spec": {
                      "terminationGracePeriodSeconds": 1,
                      "containers": [{"name": "app", "image": testapp_image(), "imagePullPolicy": "Never",
                                      "command": ["tpenv-echo"], "ports": [{"containerPort": 8080, "name": "http"}],
                                      "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"},
         "spec": {"selector": {"app": "db"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
    ], ns=ns)
    kubectl("rollout", "status", "statefulset/db", "--timeout=180s", ns=ns, timeout=200)


def pod_revisions(ns: str) -> set[str]:
    pods = kubectl_json("get", "pods", "-l", "app=db", ns=ns)["items"]
    return {p["metadata"]["labels"]["controller-revision-hash"] for p in pods}


def test_uninstall_everything_keeps_what_was_there_before(namespace, tmp_path):
    ns = namespace
    # Stage 0: no install of anyone's left over (we hold the cluster-wide lock).
    tpenv(tmp_path, "manager", "uninstall", check=False)
    wait_until("namespace tpenv gone", lambda: kubectl("get", "namespace", "tpenv", check=False).returncode != 0, 180)

    # Stage 1: the admin's namespace and RoleBinding, there before tpenv.
    kubectl("create", "namespace", "tpenv")
    apply(ADMIN_BINDING)
    try:
        # Stage 2: a StatefulSet whose pods run the agent's revision, then held there by a partition.
        statefulset(ns)
        tpenv(tmp_path, "intercept", "db", "--port", "18787:http", "-n", ns, "--mount", "false", "--", "true",
              timeout=400)
        kubectl("rollout", "status", "statefulset/db", "--timeout=180s", ns=ns, timeout=200)
        agent_rev = kubectl_json("get", "statefulset", "db", ns=ns)["status"]["updateRevision"]
        wait_until("both pods on the agent's revision", lambda: pod_revisions(ns) == {agent_rev}, 180)
        kubectl("patch", "statefulset", "db", "--type=merge",
                "-p", '{"spec":{"updateStrategy":{"rollingUpdate":{"partition":2}}}}', ns=ns)

        # Stage 2b: a dead replace's restore right (rendered by tpenv's own code), and a decoy of
        # the same name pattern that is not tpenv's.
        left = render_restore(ns, Workload("Deployment", "gone-app", ns, {}), {"patch": []}, "-")
        apply(left, ns=ns)
        assert sorted(d["kind"] for d in left) == ["Role", "RoleBinding", "Secret", "ServiceAccount"]
        apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tpenv-restore-not-ours"}}, ns=ns)

        # Stage 3: install the manager over the existing namespace, then uninstall everything.
        tpenv(tmp_path, "manager", "install", "--webhook-namespace", ns, timeout=300)
        annotations = kubectl_json("get", "namespace", "tpenv")["metadata"].get("annotations") or {}
        assert annotations.get("tpenv.io/ownership") == "adopted", annotations
        assert kubectl_json("get", "deployment", "tpenv-manager", ns="tpenv")["metadata"]["annotations"][
            "tpenv.io/ownership"] == "created"
        cp = tpenv(tmp_path, "uninstall", "--everything", "--no-wait", timeout=300)

        # Stage 4: the admin's namespace and binding stay (not terminating); tpenv's objects are gone.
        ns_obj = kubectl_json("get", "namespace", "tpenv")
        assert ns_obj["status"]["phase"] == "Active" and not ns_obj["metadata"].get("deletionTimestamp")
        assert "tpenv.io/ownership" not in (ns_obj["metadata"].get("annotations") or {})
        assert kubectl_json("get", "rolebinding", "team-readers", ns="tpenv")["roleRef"]["name"] == "view"
        for gone in (("deployment", "tpenv-manager", "tpenv"), ("mutatingwebhookconfiguration",
                                                                "tpenv-agent-injector", None),
                     ("clusterrole", "tpenv-manager", None)):
            kind, name, where = gone
            wait_until(f"{kind}/{name} deleted",
                       lambda: kubectl("get", kind, name, ns=where, check=False).returncode != 0, 120)

        # Stage 4b: the restore right is gone, the decoy stays.
        for d in left:
            assert kubectl("get", d["kind"].lower(), d["metadata"]["name"], ns=ns, check=False).returncode != 0, d
        assert f"deleted restore right {ns}/serviceaccount/tpenv-restore-gone-app" in cp.stdout, cp.stdout
        assert kubectl("get", "serviceaccount", "tpenv-restore-not-ours", ns=ns, check=False).returncode == 0

        # Stage 5: the partitioned StatefulSet's pods still run the agent's revision, and it is kept.
        assert pod_revisions(ns) == {agent_rev}, cp.stdout
        revisions = {r["metadata"]["name"] for r in kubectl_json("get", "controllerrevisions", ns=ns)["items"]}
        assert agent_rev in revisions, (agent_rev, revisions, cp.stdout)
        assert f"{ns}/{agent_rev}" not in cp.stdout
    finally:
        kubectl("delete", "namespace", "tpenv", "--wait=false", "--ignore-not-found", check=False)
