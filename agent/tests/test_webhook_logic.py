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

def test_mutate_injects_every_tcp_port_by_default_with_the_redirect():
    answer, injected = mutate(review(pod()), SETTINGS)
    response = answer["response"]
    assert answer["kind"] == "AdmissionReview" and response["uid"] == "u-1" and response["allowed"] is True
    assert injected is True and response["patchType"] == "JSONPatch"
    patched = apply_patch(pod(), json.loads(base64.b64decode(response["patch"])))
    agent = next(c for c in patched["spec"]["containers"] if c["name"] == AGENT_CONTAINER)
    assert agent["image"] == "tpenv/agent:test" and agent["imagePullPolicy"] == "Never"
    args = agent["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--listen"] == ["7900:8080:http", "7901:9000:tpenv-9000"]
    # The app keeps its ports as they were; the init container redirects them to the agent.
    assert patched["spec"]["containers"][0]["ports"] == pod()["spec"]["containers"][0]["ports"]
    init = patched["spec"]["initContainers"][0]
    assert init["name"] == "tpenv-init" and init["args"] == ["init", "--redirect", "8080:7900", "--redirect", "9000:7901"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}


def test_mutate_hands_over_named_ports_only_where_the_redirect_is_off():
    off = {**SETTINGS, "redirect": False, "redirect_off": "namespace 'shop' enforces Pod Security level 'baseline'"}
    answer, injected = mutate(review(pod()), off)
    patched = apply_patch(pod(), json.loads(base64.b64decode(answer["response"]["patch"])))
    agent = next(c for c in patched["spec"]["containers"] if c["name"] == AGENT_CONTAINER)
    assert [agent["args"][i + 1] for i, a in enumerate(agent["args"]) if a == "--listen"] == ["7900:8080:http"]
    assert patched["spec"]["containers"][0]["ports"][0]["name"] == "tpx-http" and "initContainers" not in patched["spec"]


def test_telepresence_annotation_opts_in_and_its_ports_annotation_selects():
    tp = pod(**{"telepresence.getambassador.io/inject-traffic-agent": "enabled",
                "telepresence.getambassador.io/inject-container-ports": "9000/TCP"})
    del tp["metadata"]["labels"]["tpenv.io/inject-agent"]
    answer, injected = mutate(review(tp), SETTINGS)
    patched = apply_patch(tp, json.loads(base64.b64decode(answer["response"]["patch"])))
    agent = next(c for c in patched["spec"]["containers"] if c["name"] == AGENT_CONTAINER)
    assert injected and [agent["args"][i + 1] for i, a in enumerate(agent["args"]) if a == "--listen"] == \
        ["7900:9000:tpenv-9000"]


def test_a_pod_that_did_not_opt_in_passes_untouched_and_silently():
    plain = pod()
    del plain["metadata"]["labels"]["tpenv.io/inject-agent"]
    answer, injected = mutate(review(plain), SETTINGS)
    assert answer["response"] == {"uid": "u-1", "allowed": True} and injected is False


def test_a_refused_pod_is_annotated_with_the_reason():
    udp = pod()
    udp["spec"]["containers"][0]["ports"] = [{"containerPort": 5353, "protocol": "UDP"}]
    answer, injected = mutate(review(udp), SETTINGS)
    response = answer["response"]
    assert injected is False and "no TCP port" in response["warnings"][0]
    patched = apply_patch(udp, json.loads(base64.b64decode(response["patch"])))
    assert "no TCP port" in patched["metadata"]["annotations"]["tpenv.io/not-injected"]
    assert patched["spec"] == udp["spec"]


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
    assert response["allowed"] is True and injected is False
    assert "no port named 'nope'" in response["warnings"][0]
    patched = apply_patch(bad, json.loads(base64.b64decode(response["patch"])))
    assert patched["spec"] == bad["spec"]  # only the refusal annotation


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


# --- issue 12: the control plane's namespaces and the manager's own are never injected ----------

def test_mutate_never_injects_kube_system_or_tpenv():
    for ns in ("kube-system", "tpenv"):
        answer, inject = mutate(review(pod(), namespace=ns), SETTINGS)
        assert not inject and "patch" not in answer["response"] and answer["response"]["allowed"]
        assert ns in answer["response"]["warnings"][0]
