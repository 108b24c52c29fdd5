"""The local cluster's storage manifests (tests/cluster/storage.py, templates/cluster/): rendered
and parsed, pure. That the provisioner really binds claims is e2e (tests/e2e/test_cluster_storage.py)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "cluster"))
import storage  # noqa: E402

IMAGE = "tpenv/local-path-provisioner:v9"
NODE_PATH = "/var/tmp/some path/local-path"


def _by_kind(objs: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objs}


def test_default_class_for_the_provisioner_binding_at_first_consumer():
    sc = _by_kind(storage.render(IMAGE, NODE_PATH))["StorageClass"]
    assert sc["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    assert sc["provisioner"] == storage.PROVISIONER
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["reclaimPolicy"] == "Delete"


def test_node_path_and_image_reach_config_and_pods_never_pulled():
    import json

    import yaml

    objs = _by_kind(storage.render(IMAGE, NODE_PATH))
    cm = objs["ConfigMap"]["data"]
    # The path with a space survives as data, not YAML syntax.
    assert json.loads(cm["config.json"])["nodePathMap"][0]["paths"] == [NODE_PATH]
    helper = yaml.safe_load(cm["helperPod.yaml"])["spec"]["containers"][0]
    assert (helper["image"], helper["imagePullPolicy"]) == (IMAGE, "Never")
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = pod["containers"][0]
    assert (c["image"], c["imagePullPolicy"]) == (IMAGE, "Never")
    assert c["command"][c["command"].index("--provisioner-name") + 1] == storage.PROVISIONER


def test_rbac_changes_only_persistent_volumes_cluster_wide():
    # Events it may create (it reports on claims); everything else cluster-wide is read-only.
    rules = _by_kind(storage.render(IMAGE, NODE_PATH))["ClusterRole"]["rules"]
    writes = {r for rule in rules if set(rule["verbs"]) & {"create", "update", "delete"} for r in rule["resources"]}
    assert writes == {"persistentvolumes", "events"}
    deletes = {r for rule in rules if "delete" in rule["verbs"] for r in rule["resources"]}
    assert deletes == {"persistentvolumes"}
