"""Taking the agent out again, and what injection left behind (the reverse of agents.py).

:func:`remove_agent` restores the Service first (back to the app's port, which every pod still
serves), then the workload, both from the ``tpenv.io/restore*`` annotations, byte for byte; a
409 (a controller wrote the workload meanwhile) reads it again and redoes the pure plan.
:func:`prune_agent_history` deletes the old ReplicaSets / ControllerRevisions that still hold
the agent, keeping every revision a StatefulSet may still recreate pods from
(:func:`revisions_in_use`). :func:`injected_workloads` and :func:`wait_agent_gone` serve
``uninstall`` and ``doctor``.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from tpenv.engine.injection import restore_plan
from tpenv.errors import NotFound, RolloutStalled, UpdateConflict
from tpenv.kits.kube import Kube, What, Workload, tracked
from tpenv.engine.injection import runs_agent
from tpenv_agent.inject import AGENT_CONTAINER, ANN_RESTORE, ANN_RESTORE_SERVICE, LABEL_AGENT

Progress = Callable[[str], None]
UPDATE_ATTEMPTS = 5  # a 409 on restore (or on injection, agents.py): read again and redo, at most this many times


def has_agent(obj: dict[str, Any]) -> bool:
    return LABEL_AGENT in ((obj.get("metadata") or {}).get("labels") or {})


async def remove_agent(kube: Kube, w: Workload, *, progress: Progress | None = None) -> bool:
    """Restore the workload and every Service that selects it from tpenv's annotations.

    Returns False when there was nothing to restore."""
    changed = False
    services = await kube.services_for(w) if w.template_labels else []
    for svc in services:
        if ANN_RESTORE_SERVICE not in (svc["metadata"].get("annotations") or {}):
            continue
        _, restored = restore_plan_service(w.obj, svc)
        if restored is not None:
            name = svc["metadata"]["name"]
            await kube.call(kube.core.replace_namespaced_service, name, w.namespace, restored,
                            what=What("update", "services", w.namespace, name))
            changed = True
    for attempt in range(UPDATE_ATTEMPTS):
        if not (ANN_RESTORE in (w.obj["metadata"].get("annotations") or {}) or has_agent(w.obj)):
            break
        plan = restore_plan(w.obj, None)
        if not plan.workload_changed:
            break
        if progress and attempt == 0:
            progress(f"Removing the tpenv agent from {w.ref}")
        try:
            await kube.replace_workload(w, plan.workload)
        except UpdateConflict:
            # A controller wrote the object since we read it (status, a rollout): the plan is a
            # pure function of the object, so read it again and redo it.
            if attempt == UPDATE_ATTEMPTS - 1:
                raise
            w = await kube.reload(w)
            continue
        changed = True
        break
    return changed


def restore_plan_service(workload: dict[str, Any], service: dict[str, Any]) -> tuple[dict, dict | None]:
    plan = restore_plan(workload, service)
    return plan.workload, plan.service


async def injected_workloads(kube: Kube, namespace: str | None) -> list[Workload]:
    """Workloads carrying tpenv's agent label or restore record, in one namespace or all (None)."""
    out: list[Workload] = []
    listers = {"Deployment": (kube.apps.list_namespaced_deployment, kube.apps.list_deployment_for_all_namespaces),
               "StatefulSet": (kube.apps.list_namespaced_stateful_set, kube.apps.list_stateful_set_for_all_namespaces),
               "ReplicaSet": (kube.apps.list_namespaced_replica_set, kube.apps.list_replica_set_for_all_namespaces)}
    for kind, (one, every) in listers.items():
        plural = {"Deployment": "deployments", "StatefulSet": "statefulsets", "ReplicaSet": "replicasets"}[kind]
        if namespace:
            data = await kube.call(one, namespace, what=What("list", plural, namespace))
        else:
            data = await kube.call(every, what=What("list", plural))
        for obj in data.get("items", []):
            meta = obj["metadata"]
            if kind == "ReplicaSet" and meta.get("ownerReferences"):
                continue  # a Deployment's: restored through its Deployment
            if has_agent(obj) or ANN_RESTORE in (meta.get("annotations") or {}):
                obj.setdefault("kind", kind)
                obj.setdefault("apiVersion", "apps/v1")
                out.append(Workload(kind, meta["name"], meta["namespace"], obj))
    return out


async def wait_agent_gone(kube: Kube, w: Workload, *, timeout: float, progress: Progress | None = None) -> None:
    """Until no live pod of ``w`` runs the agent container (the restored template rolled out)."""
    pods: dict[str, dict[str, Any]] = {}

    def with_agent() -> int:
        return sum(1 for p in pods.values() if not p["metadata"].get("deletionTimestamp") and runs_agent(p))

    pods = {p["metadata"]["uid"]: p for p in await kube.pods_of(w)}
    if with_agent() == 0:
        return
    if progress:
        progress(f"Waiting for the pods of {w.ref} to drop the agent")
    try:
        async with asyncio.timeout(timeout):
            async with kube.watch(kube.core.list_namespaced_pod, w.namespace, label_selector=w.selector,
                                  what=What("watch", "pods", w.namespace)) as events:
                async for _kind, _pod in tracked(events, pods):
                    # The first events replay the current pods; decide once every pod was seen.
                    if with_agent() == 0 and await _all_seen(kube, w, pods):
                        return
    except TimeoutError as e:
        raise RolloutStalled(f"pods of {w.ref} still run the agent after {timeout:.0f}s",
                             hint=f"see: kubectl get pods -n {w.namespace} -l {w.selector}") from e


async def _all_seen(kube: Kube, w: Workload, pods: dict[str, dict[str, Any]]) -> bool:
    current = await kube.pods_of(w)
    return all(p["metadata"]["uid"] in pods for p in current)


async def prune_agent_history(kube: Kube, w: Workload) -> list[str]:
    """Delete a Deployment's old ReplicaSets (scaled to 0) whose template carries the agent: the
    rollout history tpenv created; the cluster should look as if tpenv never patched it."""
    if w.kind == "StatefulSet":
        return await _prune_revisions(kube, w)
    if w.kind != "Deployment":
        return []
    data = await kube.call(kube.apps.list_namespaced_replica_set, w.namespace, label_selector=w.selector,
                           what=What("list", "replicasets", w.namespace))

    def doomed(rs: dict[str, Any]) -> bool:
        tpl_labels = ((rs["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
        # Scaled to 0 is enough: pods still terminating go with it (background deletion).
        return LABEL_AGENT in tpl_labels and not (rs["spec"].get("replicas") or 0)

    return await _delete_owned(kube, w, data.get("items", []), doomed,
                               kube.apps.delete_namespaced_replica_set, "replicasets")


async def _delete_owned(kube: Kube, w: Workload, items: list[dict[str, Any]], doomed: Callable[[dict], bool],
                        delete: Callable[..., Any], plural: str) -> list[str]:
    """Delete the objects among ``items`` that ``w`` owns and ``doomed`` picks; their names.
    One already gone (NotFound) is not counted."""
    uid = w.obj["metadata"].get("uid")
    deleted = []
    for obj in items:
        meta = obj["metadata"]
        if not any(o.get("uid") == uid for o in meta.get("ownerReferences") or []) or not doomed(obj):
            continue
        try:
            await kube.call(delete, meta["name"], w.namespace, what=What("delete", plural, w.namespace, meta["name"]))
        except NotFound:
            continue
        deleted.append(meta["name"])
    return deleted


async def revisions_in_use(kube: Kube, namespace: str, sts: dict[str, Any]) -> set[str]:
    """The ControllerRevisions a StatefulSet still needs: the one it rolls out to, every one a
    live pod of it runs (label controller-revision-hash), and the current one where the
    controller recreates pods from it. With a ``partition`` or ``updateStrategy:
    OnDelete`` pods keep running an older revision for as long as the user wants; deleting it
    would leave them unrecoverable by the controller."""
    spec, status = sts.get("spec") or {}, sts.get("status") or {}
    update, current = status.get("updateRevision"), status.get("currentRevision")
    running: set[str] = set()
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    if selector:
        pods = await kube.call(kube.core.list_namespaced_pod, namespace, label_selector=selector,
                               what=What("list", "pods", namespace))
        uid = (sts.get("metadata") or {}).get("uid")
        for pod in pods.get("items", []):
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                continue  # on its way out: the controller replaces it from the update revision
            if any(o.get("uid") == uid for o in meta.get("ownerReferences") or []):
                rev = (meta.get("labels") or {}).get("controller-revision-hash")
                if rev:
                    running.add(rev)
    strategy = spec.get("updateStrategy") or {}
    partitioned = strategy.get("type") == "OnDelete" or ((strategy.get("rollingUpdate") or {}).get("partition") or 0) > 0
    keep = {r for r in (update, *running) if r}
    # An unpartitioned rolling update creates every missing pod from the update revision, so
    # the current one matters only while a pod runs it (counted above); status.currentRevision
    # itself lags a finished rollout. A partition or OnDelete recreates pods from it: kept.
    if current and partitioned:
        keep.add(current)
    return keep


async def _prune_revisions(kube: Kube, w: Workload) -> list[str]:
    """A StatefulSet's history is ControllerRevisions: delete the old ones holding the agent."""
    data = await kube.call(kube.apps.list_namespaced_controller_revision, w.namespace, label_selector=w.selector,
                           what=What("list", "controllerrevisions", w.namespace))
    keep = await revisions_in_use(kube, w.namespace, w.obj)

    def doomed(rev: dict[str, Any]) -> bool:
        return rev["metadata"]["name"] not in keep and AGENT_CONTAINER in json.dumps(rev.get("data") or {})

    return await _delete_owned(kube, w, data.get("items", []), doomed,
                               kube.apps.delete_namespaced_controller_revision, "controllerrevisions")
