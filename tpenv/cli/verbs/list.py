"""tpenv list: the workloads of a namespace, whether they can be intercepted, and by whom.

Like Telepresence: ``hello: ready to intercept (traffic-agent not yet installed)``,
``... (traffic-agent already installed)``, or ``hello: intercepted`` with every intercept on it.
A workload whose pod template opts in to the manager's webhook but whose pods carry no agent
shows the webhook's reason: ``hello: opted in, not injected: <reason>`` (the pod annotation
``tpenv.io/not-injected``; the manager also puts it in an Event on the pod and the workload).
"By whom" comes from the agents themselves (their ``list`` op, all sessions, any machine), read
over a short SSH session to one ready pod per injected workload; this machine's running
sessions add their local details (destination).
"""
from __future__ import annotations

import argparse
import asyncio

from tpenv_agent.replace import ANN_REPLACE
from tpenv.engine.agentquery import agent_intercepts, auth_material
from tpenv.engine.agent_removal import has_agent
from tpenv.engine.agents import webhook_mode
from tpenv.engine.session import running_intercepts
from tpenv.kits.kube import Kube, What, Workload, service_selects
from tpenv_agent.inject import AGENT_CONTAINER

HELP = "List the workloads you can intercept and the intercepts active on them."
ANN_NOT_INJECTED = "tpenv.io/not-injected"  # tpenv_agent.webhook's; that module is the manager's, not the client's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass  # -n NS comes with the common options


async def _webhook_state(kube: Kube, w: Workload) -> tuple[bool, str | None]:
    """For a workload opted in to the webhook: (its pods run the agent, why the webhook refused)."""
    if not webhook_mode(w):
        return False, None
    pods = [p for p in await kube.pods_of(w) if not p["metadata"].get("deletionTimestamp")]
    if any(c.get("name") == AGENT_CONTAINER for p in pods for c in p["spec"].get("containers") or []):
        return True, None
    reasons = sorted({(p["metadata"].get("annotations") or {}).get(ANN_NOT_INJECTED) for p in pods} - {None})
    return False, (reasons[0] if reasons else None)


async def run(args: argparse.Namespace, ctx) -> int:
    kube_context, namespace = ctx.cluster_target()
    async with await Kube.load(context=kube_context) as kube:
        ns = ctx.namespace or namespace or kube.namespace
        await kube.require_namespace(ns)
        workloads = sorted(await kube.list_workloads(ns), key=lambda w: (w.name, w.kind))
        services = (await kube.call(kube.core.list_namespaced_service, ns, what=What("list", "services", ns)))["items"]
        hooked = await asyncio.gather(*(_webhook_state(kube, w) for w in workloads))
        injected = [has_agent(w.obj) or h[0] for w, h in zip(workloads, hooked)]
        material = await auth_material(kube, ns) if any(injected) else None
        port = ctx.settings.agent.ssh_port
        remote = await asyncio.gather(*(agent_intercepts(kube, w, material, port) if agent
                                        else asyncio.sleep(0, []) for w, agent in zip(workloads, injected)))
    local = {ic.get("id"): ic for _, ic in await running_intercepts(ctx.settings) if ic.get("namespace") == ns}
    rows, lines = [], []
    for w, held, agent, (_, refused) in zip(workloads, remote, injected, hooked):
        selecting = [s["metadata"]["name"] for s in services if service_selects(s, w.template_labels)]
        intercepts = held if isinstance(held, list) else []
        rows.append({"name": w.name, "kind": w.kind, "namespace": ns, "services": selecting,
                     "agent_installed": agent, "intercepts": [{**ic, **({"local": local[ic["intercept_id"]]}
                                                                       if ic.get("intercept_id") in local else {})}
                                                              for ic in intercepts],
                     "agent_error": held if isinstance(held, str) else None,
                     "replaced": ANN_REPLACE in (w.obj["metadata"].get("annotations") or {}), "not_injected": refused})
        if intercepts:
            lines.append(f"{w.name}: intercepted")
            for ic in intercepts:
                mine = local.get(ic.get("intercept_id"))
                how = "all TCP" if not ic.get("match") else f"HTTP {ic['match']}"
                if ANN_REPLACE in (w.obj["metadata"].get("annotations") or {}):
                    how += ", replace (the app container is stopped in the cluster)"
                if ic.get("mode") == "mirror":
                    m = ic.get("mirror") or {}
                    how += f", mirror (copies sent {m.get('sent', 0)}, dropped {m.get('dropped', 0)})"
                lines.append(f"    Intercept id  : {ic.get('intercept_id')}" + (" (this machine)" if mine else ""))
                lines.append(f"    Owner         : {ic.get('owner', '?')}"
                             + ("" if ic.get("verified") else " (unverified: no bearer token to check)"))
                lines.append(f"    Port          : {ic.get('port')}, {how}")
                if mine:
                    lines.append(f"    Destination   : {mine.get('destination')}")
                    if mine.get("context"):  # the session's `contexts:` entry this intercept is in
                        lines.append(f"    Context       : {mine['context']}")
        elif refused:
            lines.append(f"{w.name}: opted in, not injected: {refused}")
        elif not selecting:
            lines.append(f"{w.name}: not interceptable (no Service selects it)")
        else:
            note = f"; {held}" if isinstance(held, str) else ""
            lines.append(f"{w.name}: ready to intercept (traffic-agent {'already' if agent else 'not yet'} "
                         f"installed{note})")
    ctx.emit("\n".join(lines) or f"no workloads in namespace {ns}", rows)
    return 0
