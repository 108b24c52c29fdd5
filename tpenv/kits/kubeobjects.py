"""Pure helpers over Kubernetes objects as the kube kit returns them (JSON dicts, camelCase):
the workload wrapper, label selectors, and pod readiness. No API calls here (kube.py makes them);
kube.py re-exports these names, so ``from tpenv.kits.kube import Workload`` keeps working.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Workload:
    """A Deployment, StatefulSet or ReplicaSet, as the API server returned it (JSON dict)."""

    kind: str
    name: str
    namespace: str
    obj: dict[str, Any] = field(repr=False)

    @property
    def ref(self) -> str:
        return f"{self.kind.lower()}/{self.name}"

    @property
    def template(self) -> dict[str, Any]:
        return self.obj["spec"]["template"]

    @property
    def template_labels(self) -> dict[str, str]:
        return self.template.get("metadata", {}).get("labels") or {}

    @property
    def selector(self) -> str:
        """The workload's pod selector as a label-selector string."""
        return selector_string(self.obj["spec"].get("selector") or {})

    @property
    def containers(self) -> list[dict[str, Any]]:
        return self.template["spec"]["containers"]


def selector_string(sel: dict[str, Any]) -> str:
    """A LabelSelector (matchLabels + matchExpressions) as the string the list calls accept."""
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for expr in sel.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In":
            parts.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts)


def service_selects(service: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Service's selector picks pods with ``labels`` (an empty selector picks none)."""
    sel = (service.get("spec") or {}).get("selector") or {}
    return bool(sel) and all(labels.get(k) == v for k, v in sel.items())


def pod_is_ready(pod: dict[str, Any]) -> bool:
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
