"""The webhook's pure logic: JSONPatch generation and AdmissionReview answers (no server)."""
from __future__ import annotations

import base64
import copy
import json

from tpenv_agent.inject import AGENT_CONTAINER, inject_pod
from tpenv_agent.webhook import json_patch, mutate

SETTINGS = {"agent_image": "tpenv/agent:test", "image_pull_policy": "Never", "lease": 5}


def apply_patch(doc, ops):
    """A minimal RFC 6902 applier (add/replace/remove), to check our patches do what they say."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if op["op"] == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif op["op"] == "add" and isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), op["value"])
        else:
            assert op["op"] in ("add", "replace"), op
            if op["op"] == "replace":
                assert (int(last) if isinstance(parent, list) else last) in (range(len(parent)) if isinstance(parent, list) else parent)
            parent[int(last) if isinstance(parent, list) else last] = op["value"]
    return doc


def pod(**annotations):
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-7d9f-", "namespace": "shop",
                     "labels": {"app": "web", "tpenv.io/inject-agent": "enabled"},
                     **({"annotations": annotations} if annotations else {})},
        "spec": {"containers": [{"name": "web", "image": "nginx",
                                 "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9000}]}]},
    }


def review(obj, **request):
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": "CREATE", "namespace": "shop", "object": obj, **request}}


# --- stage 1: json_patch -----------------------------------------------------------------------

def test_json_patch_turns_before_into_after():
    before = pod()
    after = inject_pod(before, SETTINGS)
    ops = json_patch(before, after)
    assert apply_patch(before, ops) == after


def test_json_patch_escapes_slashes_in_keys_and_removes():
    ops = json_patch({"metadata": {"labels": {"a/b": "1", "x~y": "2"}}}, {"metadata": {"labels": {"x~y": "3"}}})
    assert {"op": "remove", "path": "/metadata/labels/a~1b"} in ops
    assert {"op": "replace", "path": "/metadata/labels/x~0y", "value": "3"} in ops


def test_json_patch_of_equal_documents_is_empty():
    assert json_patch(pod(), pod()) == []


# --- stage 2: mutate -----------------------------------------------------------------------------

def test_mutate_injects_named_ports_by_default():
    answer, injected = mutate(review(pod()), SETTINGS)
    response = answer["response"]
    assert answer["kind"] == "AdmissionReview" and response["uid"] == "u-1" and response["allowed"] is True
    assert injected is True and response["patchType"] == "JSONPatch"
    patched = apply_patch(pod(), json.loads(base64.b64decode(response["patch"])))
    agent = next(c for c in patched["spec"]["containers"] if c["name"] == AGENT_CONTAINER)
    assert agent["image"] == "tpenv/agent:test" and agent["imagePullPolicy"] == "Never"
    assert agent["args"][:5] == ["sidecar", "--container", "web", "--listen", "7900:8080:http"]
    assert "--listen" not in agent["args"][5:]  # the unnamed port 9000 is not taken
    assert patched["spec"]["containers"][0]["ports"][0]["name"] == "tpx-http"


def test_mutate_honours_inject_ports_annotation():
    annotated = pod(**{"tpenv.io/inject-ports": "http, 9000"})
    answer, _ = mutate(review(annotated), SETTINGS)
    patched = apply_patch(annotated, json.loads(base64.b64decode(answer["response"]["patch"])))
    args = next(c for c in patched["spec"]["containers"] if c["name"] == AGENT_CONTAINER)["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--listen"] == ["7900:8080:http", "7901:9000:tpenv-9000"]


def test_mutate_never_refuses_a_pod_it_cannot_inject():
    bad = pod(**{"tpenv.io/inject-ports": "nope"})
    answer, injected = mutate(review(bad), SETTINGS)
    response = answer["response"]
    assert response["allowed"] is True and "patch" not in response and injected is False
    assert "no port named 'nope'" in response["warnings"][0]


def test_mutate_leaves_other_requests_alone():
    for req in (review(pod(), operation="UPDATE"), review({"kind": "Service"}, kind={"kind": "Service"})):
        answer, injected = mutate(req, SETTINGS)
        assert answer["response"] == {"uid": "u-1", "allowed": True} and injected is False


def test_dry_run_patches_but_reports_no_side_effect_wanted():
    answer, injected = mutate(review(pod(), dryRun=True), SETTINGS)
    assert "patch" in answer["response"] and injected is False


def test_already_injected_pod_gets_no_patch():
    answer, injected = mutate(review(inject_pod(pod(), SETTINGS)), SETTINGS)
    assert "patch" not in answer["response"] and injected is False
