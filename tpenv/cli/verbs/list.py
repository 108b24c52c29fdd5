"""tpenv list: the workloads of a namespace, whether they can be intercepted, and by whom.

Like Telepresence: ``hello: ready to intercept (traffic-agent not yet installed)``,
``... (traffic-agent already installed)``, or ``hello: intercepted`` with every intercept on it.
"By whom" comes from the agents themselves (their ``list`` op, all sessions, any machine), read
over a short SSH session to one ready pod per injected workload; this machine's running
sessions add their local details (destination).
"""
from __future__ import annotations

import argparse
import asyncio

from tpenv.engine.agentquery import agent_intercepts, auth_material
from tpenv.engine.agents import has_agent
from tpenv.engine.session import running_intercepts
from tpenv.kits.kube import Kube, What, service_selects

HELP = "List the workloads you can intercept and the intercepts active on them."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass  # -n NS comes with the common options


async def run(args: argparse.Namespace, ctx) -> int:
    async with await Kube.load(context=ctx.cluster_context()) as kube:
        ns = ctx.namespace or kube.namespace
        await kube.require_namespace(ns)
        workloads = sorted(await kube.list_workloads(ns), key=lambda w: (w.name, w.kind))
        services = (await kube.call(kube.core.list_namespaced_service, ns, what=What("list", "services", ns)))["items"]
        material = await auth_material(kube, ns) if any(has_agent(w.obj) for w in workloads) else None
        port = ctx.settings.agent.ssh_port
        remote = await asyncio.gather(*(agent_intercepts(kube, w, material, port) if has_agent(w.obj)
                                        else asyncio.sleep(0, []) for w in workloads))
    local = {ic.get("id"): ic for _, ic in await running_intercepts(ctx.settings) if ic.get("namespace") == ns}
    rows, lines = [], []
    for w, held in zip(workloads, remote):
        selecting = [s["metadata"]["name"] for s in services if service_selects(s, w.template_labels)]
        agent = has_agent(w.obj)
        intercepts = held if isinstance(held, list) else []
        rows.append({"name": w.name, "kind": w.kind, "namespace": ns, "services": selecting,
                     "agent_installed": agent, "intercepts": [{**ic, **({"local": local[ic["intercept_id"]]}
                                                                       if ic.get("intercept_id") in local else {})}
                                                              for ic in intercepts],
                     "agent_error": held if isinstance(held, str) else None})
        if intercepts:
            lines.append(f"{w.name}: intercepted")
            for ic in intercepts:
                mine = local.get(ic.get("intercept_id"))
                how = "all TCP" if not ic.get("match") else f"HTTP {ic['match']}"
                lines.append(f"    Intercept id  : {ic.get('intercept_id')}" + (" (this machine)" if mine else ""))
                lines.append(f"    Owner         : {ic.get('owner', '?')}"
                             + ("" if ic.get("verified") else " (unverified: no bearer token to check)"))
                lines.append(f"    Port          : {ic.get('port')}, {how}")
                if mine:
                    lines.append(f"    Destination   : {mine.get('destination')}")
                    if mine.get("context"):  # the session's `contexts:` entry this intercept is in
                        lines.append(f"    Context       : {mine['context']}")
        elif not selecting:
            lines.append(f"{w.name}: not interceptable (no Service selects it)")
        else:
            note = f"; {held}" if isinstance(held, str) else ""
            lines.append(f"{w.name}: ready to intercept (traffic-agent {'already' if agent else 'not yet'} "
                         f"installed{note})")
    ctx.emit("\n".join(lines) or f"no workloads in namespace {ns}", rows)
    return 0
