"""The mutating webhook's logic, pure: AdmissionReview (v1) in, AdmissionReview out.

The HTTPS server around it is manager.py. The patch is computed by diffing the pod before and
after ``inject_pod``, so the webhook and patch mode share one definition of "injected".

A webhook must never stop a pod from being created because of tpenv: every failure to inject
is answered ``allowed: true`` without a patch and with a warning (which kubectl prints), and
the webhook configuration's ``failurePolicy: Ignore`` covers a manager that is down.
"""
from __future__ import annotations

import base64
import json

from .inject import InjectError, inject_pod

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
    try:
        patched = inject_pod(pod, settings)
    except InjectError as e:
        response["warnings"] = [_warning(f"tpenv: no agent injected: {e}")]
        return answer, False
    ops = json_patch(pod, patched)
    if ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode()
    return answer, bool(ops) and not request.get("dryRun", False)


__all__ = ["mutate", "json_patch", "ADMISSION_API"]
