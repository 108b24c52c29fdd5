"""The mutating webhook's logic, pure: AdmissionReview (v1) in, AdmissionReview out.

The HTTPS server around it is manager.py. The patch is computed by diffing the pod before and
after ``inject_pod``, so the webhook and patch mode share one definition of "injected".

A webhook must never stop a pod from being created because of tpenv: every failure to inject
is answered ``allowed: true`` with a warning (which kubectl prints) and a patch that only adds
the annotation ``tpenv.io/not-injected: <reason>`` (so ``tpenv list`` can show it and the
manager can put an Event on the pod once it exists), and the webhook configuration's
``failurePolicy: Ignore`` covers a manager that is down.

Pods reach the webhook by tpenv's label (objectSelector) or, through a second webhook entry
that sees every unlabelled pod, for Telepresence's annotation; a pod with neither is admitted
untouched and silently.
"""
from __future__ import annotations

import base64
import json

from .inject import InjectError, inject_pod
from .inpod import opted_in

ANN_NOT_INJECTED = "tpenv.io/not-injected"  # on a pod that opted in but got no agent: why

ADMISSION_API = "admission.k8s.io/v1"
WARNING_MAX = 256  # the API server truncates longer warnings; keep ours whole


def _escape(key: str) -> str:
    # RFC 6901: "~" and "/" in a key (annotation and label names have "/") must be escaped.
    return key.replace("~", "~0").replace("/", "~1")


def json_patch(before, after, path: str = "") -> list[dict]:
    """RFC 6902 operations turning ``before`` into ``after``.

    Objects are diffed key by key; a changed list is replaced whole (a pod's containers list is
    small, and index-based ops on lists other webhooks may also edit are fragile).
    """
    if isinstance(before, dict) and isinstance(after, dict):
        ops: list[dict] = []
        for key in before:
            if key not in after:
                ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key, value in after.items():
            sub = f"{path}/{_escape(key)}"
            if key not in before:
                ops.append({"op": "add", "path": sub, "value": value})
            elif before[key] != value:
                ops.extend(json_patch(before[key], value, sub))
        return ops
    if before == after:
        return []
    return [{"op": "replace", "path": path, "value": after}]


def _warning(text: str) -> str:
    return text if len(text) <= WARNING_MAX else text[: WARNING_MAX - 1] + "…"


# Never injected, whatever the webhook configuration's namespaceSelector says (an edited or
# stale configuration must not put agents, and Secrets, into the control plane's namespaces
# or the manager's own).
EXCLUDED_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease", "tpenv"})


def mutate(review: dict, settings: dict) -> tuple[dict, bool]:
    """Answer one AdmissionReview. Returns (the answer, whether the pod gets an agent).

    The second value lets the caller do what a pure function cannot (create the pod namespace's
    tpenv-auth Secret); it is False for dry-run requests, which must have no side effects.
    """
    request = review.get("request") or {}
    response: dict = {"uid": request.get("uid", ""), "allowed": True}
    answer = {"apiVersion": review.get("apiVersion") or ADMISSION_API, "kind": "AdmissionReview",
              "response": response}
    kind = (request.get("kind") or {}).get("kind")
    pod = request.get("object")
    if kind != "Pod" or request.get("operation", "CREATE") != "CREATE" or not isinstance(pod, dict):
        return answer, False
    if not opted_in(pod):
        return answer, False
    namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace")
    if namespace in EXCLUDED_NAMESPACES:
        response["warnings"] = [_warning(f"tpenv: no agent injected: namespace {namespace} is never injected")]
        return answer, False
    try:
        patched = inject_pod(pod, settings)
    except InjectError as e:
        return refusal(review, str(e)), False
    ops = json_patch(pod, patched)
    if ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode()
    return answer, bool(ops) and not request.get("dryRun", False)


def refusal(review: dict, reason: str) -> dict:
    """The answer admitting the review's pod without an agent: a warning, and a patch adding only
    the refusal annotation (what Events, `tpenv list` and `doctor` show)."""
    request = review.get("request") or {}
    pod = request.get("object") or {}
    ops = json_patch(pod, refused(pod, reason))
    return {"apiVersion": review.get("apiVersion") or ADMISSION_API, "kind": "AdmissionReview",
            "response": {"uid": request.get("uid", ""), "allowed": True,
                         "warnings": [_warning(f"tpenv: no agent injected: {reason}")],
                         "patchType": "JSONPatch",
                         "patch": base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode()}}


def refused(pod: dict, reason: str) -> dict:
    """The pod with only the refusal annotation added (a new dict)."""
    out = dict(pod)
    meta = dict(out.get("metadata") or {})
    meta["annotations"] = {**(meta.get("annotations") or {}), ANN_NOT_INJECTED: reason}
    out["metadata"] = meta
    return out


__all__ = ["mutate", "json_patch", "refused", "refusal", "ADMISSION_API", "ANN_NOT_INJECTED",
           "EXCLUDED_NAMESPACES"]
