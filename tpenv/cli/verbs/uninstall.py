"""tpenv uninstall: take tpenv out of the cluster, restoring what it changed byte for byte.

``--agent W`` and ``--all-agents`` restore workloads (and the Services whose targetPort tpenv
rewrote) from the ``tpenv.io/restore*`` annotations and wait until no pod runs the agent.
``--all-agents`` then deletes the namespace's ``tpenv-auth`` Secret once no pod there mounts it.
``--everything`` does that in every namespace, then deletes the ``tpenv-auth`` Secrets and the
manager, so the cluster is as it was before tpenv touched it. Both sweep for Services whose
targetPort still names a ``tpenv-<n>`` port no pod has (a GitOps revert of the workload leaves
them; tpenv.engine.strayports, shared with ``doctor --fix``) and put the number back.
"""
from __future__ import annotations

import argparse
import sys

from tpenv.engine.agent_removal import (injected_workloads, prune_agent_history, remove_agent, revisions_in_use,
                                        wait_agent_gone)
from tpenv.engine.replace import remove_restore_right, sweep_restore_rights, undo_replace
from tpenv.engine.strayports import find_stray_services, repair_stray
from tpenv.engine.teammode import NAMESPACE as MANAGER_NS
from tpenv.errors import Forbidden, NotFound
from tpenv.kits.kube import Kube, What
from tpenv_agent.inject import ANN_RESTORE_SERVICE, AUTH_SECRET, LABEL_AGENT, restore

HELP = "Remove agents from workloads, restoring them exactly as they were."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--agent", metavar="WORKLOAD", help="remove the agent from this workload")
    which.add_argument("--all-agents", action="store_true", help="remove every agent in the namespace, then its tpenv-auth Secret once no pod mounts it")
    which.add_argument("--everything", action="store_true",
                       help="remove every trace of tpenv: agents, secrets, the manager")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for the pods to drop the agent")


async def run(args: argparse.Namespace, ctx) -> int:
    say = (lambda text: print(text, file=sys.stderr, flush=True))
    done: dict[str, list[str]] = {"workloads": [], "replicasets": [], "services": [], "secrets": [], "manager": []}
    async with await Kube.load(context=ctx.cluster_context()) as kube:
        ns = ctx.namespace or kube.namespace
        if args.agent:
            workloads = [await kube.get_workload(args.agent, ns)]
        else:
            workloads = await injected_workloads(kube, None if args.everything else ns)
        if args.everything:
            # A namespace being deleted takes its workloads with it; updates there are refused.
            data = await kube.call(kube.core.list_namespace, what=What("list", "namespaces"))
            gone = {n["metadata"]["name"] for n in data.get("items", []) if n["metadata"].get("deletionTimestamp")}
            workloads = [w for w in workloads if w.namespace not in gone]
        restored = []
        for w in workloads:
            try:
                w = await undo_replace(kube, w)  # a replaced app first comes back from its restore patch
                try:
                    await remove_restore_right(kube, w)
                except Forbidden:
                    pass  # who may not delete ServiceAccounts/Roles could not have made a replace's either
                if await remove_agent(kube, w, progress=say):
                    done["workloads"].append(f"{w.namespace}/{w.ref}")
                restored.append(w)
            except NotFound:
                if args.agent:
                    raise
                continue  # deleted meanwhile: nothing left to restore
        workloads = restored
        if args.everything:
            done["services"] = await _restore_stray_services(kube)
            done["secrets"] = await _delete_secrets(kube)
            # Restore rights (templates/replace/restore.yaml.j2) a dead replace left behind.
            done["restore_rights"] = await sweep_restore_rights(kube)
            from tpenv.engine import manager

            done["manager"] = await manager.uninstall(kube)
        if not args.no_wait:
            timeout = float(ctx.settings.kube.rollout_timeout)
            for w in workloads:
                try:
                    await wait_agent_gone(kube, w, timeout=timeout, progress=say)
                    await prune_agent_history(kube, await kube.reload(w))
                except NotFound:
                    continue
        if args.everything:
            done["replicasets"] = await _delete_agent_history(kube)
        if args.all_agents and not args.no_wait:
            done["secrets"] = await _delete_unused_secret(kube, ns)
        if args.all_agents or args.everything:
            # The sweep (after the waits, so the pods are the ones that stay): a Service still
            # naming a tpenv-<n> port no pod has, e.g. after a GitOps revert of its Deployment.
            _, strays = await find_stray_services(kube, None if args.everything else ns)
            done["services"] += await repair_stray(kube, strays)
    if args.agent and not done["workloads"]:
        ctx.emit(f"{args.agent}: no tpenv agent to remove", done)
    else:
        lines = [f"restored {x}" for x in done["workloads"] + done["services"]]
        lines += [f"deleted old revision {x}" for x in done["replicasets"]]
        lines += [f"deleted Secret {x}" for x in done["secrets"]] + [f"deleted {x}" for x in done["manager"]]
        lines += [f"deleted restore right {x}" for x in done.get("restore_rights", [])]
        ctx.emit("\n".join(lines) or "nothing of tpenv's was found", done)
    return 0


async def _restore_stray_services(kube: Kube) -> list[str]:
    """Services still carrying a restore record (their workload gone or never injected by us)."""
    data = await kube.call(kube.core.list_service_for_all_namespaces, what=What("list", "services"))
    out = []
    for svc in data.get("items", []):
        if ANN_RESTORE_SERVICE not in (svc["metadata"].get("annotations") or {}):
            continue
        _, restored = restore({"metadata": {}}, svc)
        if restored is not None:
            name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
            await kube.call(kube.core.replace_namespaced_service, name, ns, restored,
                            what=What("update", "services", ns, name))
            out.append(f"{ns}/service/{name}")
    return out


async def _delete_secrets(kube: Kube) -> list[str]:
    data = await kube.call(kube.core.list_secret_for_all_namespaces,
                           label_selector="app.kubernetes.io/managed-by=tpenv",
                           field_selector=f"metadata.name={AUTH_SECRET}", what=What("list", "secrets"))
    out = []
    for s in data.get("items", []):
        ns = s["metadata"]["namespace"]  # the field selector: its name is AUTH_SECRET
        if await _delete_auth_secret(kube, ns):
            out.append(f"{ns}/{AUTH_SECRET}")
    return out


async def _delete_unused_secret(kube: Kube, ns: str) -> list[str]:
    """The namespace's tpenv-auth (the agents' SSH CA), once no pod there mounts it: what tpenv made
    for its agents goes with the last of them. Never the manager's own (the relay's keys); a pod
    the webhook injects later gets it back (the webhook creates it at admission when missing)."""
    if ns == MANAGER_NS:
        return []
    pods = await kube.call(kube.core.list_namespaced_pod, ns, what=What("list", "pods", ns))
    for pod in pods.get("items", []):
        if pod["metadata"].get("deletionTimestamp") or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            continue  # ending: its volumes are mounted already, and it starts no container again
        for vol in pod["spec"].get("volumes") or []:
            if (vol.get("secret") or {}).get("secretName") == AUTH_SECRET:
                return []  # still in use (an agent the webhook injected, or a pod still ending)
    try:
        secret = await kube.call(kube.core.read_namespaced_secret, AUTH_SECRET, ns,
                                 what=What("get", "secrets", ns, AUTH_SECRET))
    except NotFound:
        return []
    if (secret["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") != "tpenv":
        return []  # not made by tpenv: not ours to delete
    return [f"{ns}/{AUTH_SECRET}"] if await _delete_auth_secret(kube, ns) else []


async def _delete_auth_secret(kube: Kube, ns: str) -> bool:
    """False when it was gone already."""
    return await kube.found(kube.core.delete_namespaced_secret, AUTH_SECRET, ns,
                            what=What("delete", "secrets", ns, AUTH_SECRET))


async def _delete_agent_history(kube: Kube) -> list[str]:
    """Old ReplicaSets (scaled to 0) of Deployments whose template once had the agent: the
    Deployment controller copies template labels to its ReplicaSets, so the agent label finds them."""
    data = await kube.call(kube.apps.list_replica_set_for_all_namespaces, label_selector=LABEL_AGENT,
                           what=What("list", "replicasets"))
    out = []
    for rs in data.get("items", []):
        meta = rs["metadata"]
        if rs["spec"].get("replicas") or not meta.get("ownerReferences") or meta.get("deletionTimestamp"):
            continue  # live, or not a Deployment's history
        try:
            await kube.call(kube.apps.delete_namespaced_replica_set, meta["name"], meta["namespace"],
                            what=What("delete", "replicasets", meta["namespace"], meta["name"]))
        except NotFound:
            continue
        out.append(f"{meta['namespace']}/{meta['name']}")
    # StatefulSets keep their history as ControllerRevisions (labelled like the template).
    data = await kube.call(kube.apps.list_controller_revision_for_all_namespaces, label_selector=LABEL_AGENT,
                           what=What("list", "controllerrevisions"))
    for rev in data.get("items", []):
        meta = rev["metadata"]
        owner = next((o for o in meta.get("ownerReferences") or [] if o.get("kind") == "StatefulSet"), None)
        if owner is None or meta.get("deletionTimestamp"):
            continue
        try:
            sts = await kube.call(kube.apps.read_namespaced_stateful_set, owner["name"], meta["namespace"],
                                  what=What("get", "statefulsets", meta["namespace"], owner["name"]))
            if meta["name"] in await revisions_in_use(kube, meta["namespace"], sts):
                continue  # a revision its pods run or it rolls out to: not history
            await kube.call(kube.apps.delete_namespaced_controller_revision, meta["name"], meta["namespace"],
                            what=What("delete", "controllerrevisions", meta["namespace"], meta["name"]))
        except NotFound:
            continue
        out.append(f"{meta['namespace']}/{meta['name']}")
    return out
