"""Services whose named ``targetPort`` is a port none of their pods has: found and put back.

What a GitOps revert leaves: tpenv handed a Service's port to the agent (``tpenv-8080``, or the
app's port name moved to the agent), then something else (Argo CD, Flux, a ``kubectl apply`` of
the original manifest) put the Deployment back without the agent but left the Service alone, or
the other way round. Every request to that Service then fails.

One definition, two callers: ``tpenv doctor`` (the ``cluster/service-ports`` check; ``--fix``
applies the repair) and ``tpenv uninstall --all-agents | --everything`` (the sweep, which applies
it unasked since uninstall's promise is "nothing of tpenv's left pointing nowhere").

A repair is only made where tpenv knows the right answer: its restore record on the Service, or
the number in a ``tpenv-<n>`` port name. Other broken names are reported, never guessed at.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tpenv.errors import NotFound
from tpenv.kits.kube import Kube, What, service_selects
from tpenv_agent.inject import ANN_RESTORE_SERVICE, restore

_TPENV_PORT = re.compile(r"^tpenv-(\d+)$")


@dataclass
class StrayService:
    """A Service with named targetPorts no selected pod has; ``target`` is the repaired Service
    (None when tpenv cannot know what it should be)."""

    service: dict[str, Any]
    broken: list[str]
    target: dict[str, Any] | None

    @property
    def name(self) -> str:
        return self.service["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.service["metadata"]["namespace"]


def _pod_port_names(pod: dict[str, Any]) -> set[str]:
    return {p["name"] for c in (pod.get("spec") or {}).get("containers") or [] for p in c.get("ports") or []
            if p.get("name")}


def repaired(svc: dict[str, Any], broken: list[str]) -> dict[str, Any] | None:
    """The Service as it should be: from tpenv's restore record, else numbers from ``tpenv-<n>``."""
    if ANN_RESTORE_SERVICE in (svc["metadata"].get("annotations") or {}):
        _, restored = restore({"metadata": {}}, svc)
        if restored is not None:
            return restored
    fixed = {**svc, "spec": {**svc["spec"], "ports": [dict(p) for p in svc["spec"]["ports"]]}}
    changed = False
    for p in fixed["spec"]["ports"]:
        m = _TPENV_PORT.match(str(p.get("targetPort", "")))
        if p.get("targetPort") in broken and m:
            p["targetPort"] = int(m.group(1))
            changed = True
    return fixed if changed else None


def stray_in(services: list[dict[str, Any]], pods: list[dict[str, Any]]) -> list[StrayService]:
    """Pure: the Services of ``services`` pointing at a port name none of their (live) pods has.
    A Service selecting no pod (scaled to zero, no selector) has nothing to compare with: skipped."""
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    found = []
    for svc in services:
        ns = svc["metadata"].get("namespace")
        selected = [p for p in live if p["metadata"].get("namespace") == ns
                    and service_selects(svc, p["metadata"].get("labels") or {})]
        if not selected:
            continue
        names = set().union(*(_pod_port_names(p) for p in selected))
        broken = [str(p["targetPort"]) for p in svc["spec"].get("ports") or []
                  if isinstance(p.get("targetPort"), str) and not p["targetPort"].isdigit()
                  and p["targetPort"] not in names]
        if broken:
            found.append(StrayService(svc, broken, repaired(svc, broken)))
    return found


async def find_stray_services(kube: Kube, namespace: str | None) -> tuple[int, list[StrayService]]:
    """(how many Services ``namespace`` has, the stray ones among them); None: every namespace."""
    if namespace is None:
        services = (await kube.call(kube.core.list_service_for_all_namespaces, what=What("list", "services")))["items"]
        pods = (await kube.call(kube.core.list_pod_for_all_namespaces, what=What("list", "pods")))["items"]
    else:
        services = (await kube.call(kube.core.list_namespaced_service, namespace,
                                    what=What("list", "services", namespace)))["items"]
        pods = (await kube.call(kube.core.list_namespaced_pod, namespace,
                                what=What("list", "pods", namespace)))["items"]
    return len(services), stray_in(services, pods)


async def repair_stray(kube: Kube, strays: list[StrayService]) -> list[str]:
    """Put back each repairable Service; one line per change (a Service deleted meanwhile is skipped)."""
    changed = []
    for s in strays:
        if s.target is None:
            continue
        try:
            await kube.call(kube.core.replace_namespaced_service, s.name, s.namespace, s.target,
                            what=What("update", "services", s.namespace, s.name))
        except NotFound:
            continue
        ports = ", ".join(f"{p.get('port')}->{p.get('targetPort', p.get('port'))}" for p in s.target["spec"]["ports"])
        changed.append(f"service/{s.name} in {s.namespace}: targetPort {', '.join(s.broken)} put back ({ports})")
    return changed


def patch_command(namespace: str, svc: dict[str, Any], target: dict[str, Any]) -> str:
    """The kubectl line that does what the repair does (for those who fix by hand)."""
    ops = [{"op": "replace", "path": f"/spec/ports/{i}/targetPort", "value": new.get("targetPort", new.get("port"))}
           for i, (old, new) in enumerate(zip(svc["spec"]["ports"], target["spec"]["ports"]))
           if old.get("targetPort") != new.get("targetPort")]
    return (f"kubectl -n {namespace} patch service {svc['metadata']['name']} --type=json "
            f"-p '{json.dumps(ops, separators=(',', ':'))}'")


__all__ = ["StrayService", "stray_in", "find_stray_services", "repair_stray", "repaired", "patch_command"]
