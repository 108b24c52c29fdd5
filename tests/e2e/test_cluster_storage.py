"""The local cluster provisions volumes (issue 16, storage): the default StorageClass is
rancher's local-path-provisioner, installed by `cluster up`.

Each test has its own namespace; the pods are tpenv/testapp (Debian + sh), run non-root as
charts run their apps, writing into the claimed directory.
"""
from __future__ import annotations

import pytest

from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, wait_until
from tests.kit.apps import testapp_image

pytestmark = pytest.mark.e2e

TESTAPP = testapp_image()
NON_ROOT = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001}


def _container(volume: str, path: str) -> dict:
    return {"name": "main", "image": TESTAPP, "imagePullPolicy": "Never", "command": ["sleep", "infinity"],
            "securityContext": {"allowPrivilegeEscalation": False},
            "volumeMounts": [{"name": volume, "mountPath": path}]}


def test_default_storage_class_is_the_provisioner(kubeconfig):
    # A claim without storageClassName (as charts write them) gets the default class: there is exactly one.
    classes = kubectl_json("get", "storageclass")["items"]
    default = [c["metadata"]["name"] for c in classes
               if c["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class") == "true"]
    assert default == ["local-path"], f"default StorageClass(es): {default}"
    assert next(c for c in classes if c["metadata"]["name"] == "local-path")["provisioner"] == "rancher.io/local-path"


def test_pvc_binds_and_is_writable_then_released(namespace):
    # Stage 1: a claim with no class, and a non-root pod that uses it (WaitForFirstConsumer:
    # the claim binds once the pod is scheduled).
    apply([
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "user"},
         "spec": {"terminationGracePeriodSeconds": 1, "securityContext": NON_ROOT,
                  "containers": [_container("data", "/data")],
                  "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}},
    ], ns=namespace)
    kubectl("wait", "--for=jsonpath={.status.phase}=Bound", "pvc/data", "--timeout=180s", ns=namespace, timeout=200)
    kubectl("wait", "--for=condition=Ready", "pod/user", "--timeout=180s", ns=namespace, timeout=200)
    pvc = kubectl_json("get", "pvc", "data", ns=namespace)
    assert pvc["spec"]["storageClassName"] == "local-path"
    pv_name = pvc["spec"]["volumeName"]

    # Stage 2: the non-root user writes into it and reads it back.
    kubectl("exec", "user", "--", "sh", "-c", "echo hello-volume > /data/f", ns=namespace)
    assert kubectl("exec", "user", "--", "cat", "/data/f", ns=namespace).stdout == "hello-volume\n"

    # Stage 3: reclaimPolicy Delete: deleting the claim removes the volume (the teardown helper pod ran).
    kubectl("delete", "pod", "user", "--wait=true", "--timeout=120s", ns=namespace, timeout=150)
    kubectl("delete", "pvc", "data", "--wait=true", "--timeout=120s", ns=namespace, timeout=150)
    kubectl("wait", "--for=delete", f"pv/{pv_name}", "--timeout=180s", timeout=200)


def test_statefulset_keeps_data_across_pod_delete(namespace):
    # Stage 1: a StatefulSet with volumeClaimTemplates and its headless Service, as database charts make them.
    apply([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"},
         "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 8080}]}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
         "spec": {"serviceName": "db", "replicas": 1, "selector": {"matchLabels": {"app": "db"}},
                  "template": {"metadata": {"labels": {"app": "db"}},
                               "spec": {"terminationGracePeriodSeconds": 1, "securityContext": NON_ROOT,
                                        "containers": [_container("data", "/var/lib/db")]}},
                  "volumeClaimTemplates": [{"metadata": {"name": "data"},
                                            "spec": {"accessModes": ["ReadWriteOnce"],
                                                     "resources": {"requests": {"storage": "64Mi"}}}}]}},
    ], ns=namespace)
    kubectl("rollout", "status", "statefulset/db", "--timeout=180s", ns=namespace, timeout=200)
    kubectl("wait", "--for=jsonpath={.status.phase}=Bound", "pvc/data-db-0", "--timeout=60s", ns=namespace, timeout=90)
    first_uid = kubectl_json("get", "pod", "db-0", ns=namespace)["metadata"]["uid"]

    # Stage 2: write, delete the pod; the controller makes a new db-0 on the same claim.
    kubectl("exec", "db-0", "--", "sh", "-c", "echo row-1 > /var/lib/db/table", ns=namespace)
    kubectl("delete", "pod", "db-0", "--wait=true", "--timeout=120s", ns=namespace, timeout=150)
    # The controller makes the new db-0 after the old one is gone: wait for it to exist, then be Ready.
    wait_until("the new db-0", lambda: kubectl("get", "pod", "db-0", ns=namespace, check=False).returncode == 0, 120)
    kubectl("wait", "--for=condition=Ready", "pod/db-0", "--timeout=180s", ns=namespace, timeout=200)
    assert kubectl_json("get", "pod", "db-0", ns=namespace)["metadata"]["uid"] != first_uid, "not a new pod"

    # Stage 3: the new pod reads what the old one wrote.
    assert kubectl("exec", "db-0", "--", "cat", "/var/lib/db/table", ns=namespace).stdout == "row-1\n"
