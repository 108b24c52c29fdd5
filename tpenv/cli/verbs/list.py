"""tpenv list: the workloads of a namespace, whether they can be intercepted, and by whom.

Like Telepresence: ``hello: ready to intercept (traffic-agent not yet installed)``,
``... (traffic-agent already installed)``, or ``hello: intercepted`` with the intercepts this
machine's running sessions hold on it.
"""
from __future__ import annotations

import argparse

from tpenv.engine.agents import has_agent
from tpenv.engine.session import running_intercepts
from tpenv.kits.kube import Kube, service_selects

HELP = "List the workloads you can intercept and the intercepts active on them."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass  # -n NS comes with the common options


async def run(args: argparse.Namespace, ctx) -> int:
    async with await Kube.load(context=ctx.kube_context) as kube:
        ns = ctx.namespace or kube.namespace
        await kube.require_namespace(ns)
        workloads = await kube.list_workloads(ns)
        from tpenv.kits.kube import What

        services = (await kube.call(kube.core.list_namespaced_service, ns, what=What("list", "services", ns)))["items"]
    held = await running_intercepts(ctx.settings)
    rows, lines = [], []
    for w in sorted(workloads, key=lambda w: (w.name, w.kind)):
        selecting = [s["metadata"]["name"] for s in services if service_selects(s, w.template_labels)]
        mine = [ic for _, ic in held if ic.get("namespace") == ns and ic.get("workload") == w.name]
        agent = has_agent(w.obj)
        rows.append({"name": w.name, "kind": w.kind, "namespace": ns, "services": selecting,
                     "agent_installed": agent, "intercepts": mine})
        if mine:
            lines.append(f"{w.name}: intercepted")
            for ic in mine:
                lines.append(f"    Intercept name: {ic['name']}")
                lines.append(f"    State         : {ic.get('state')}")
                lines.append(f"    Destination   : {ic.get('destination')}")
                lines.append(f"    Intercept id  : {ic.get('id')}")
        elif not selecting:
            lines.append(f"{w.name}: not interceptable (no Service selects it)")
        else:
            lines.append(f"{w.name}: ready to intercept (traffic-agent {'already' if agent else 'not yet'} installed)")
    ctx.emit("\n".join(lines) or f"no workloads in namespace {ns}", rows)
    return 0
