"""Doctor's checks of what a crash or a GitOps revert leaves in the namespace.

- **idle agents**: a workload tpenv patched (patch mode) whose agent holds no intercept of any
  session. After a ``leave`` that is by design (DESIGN: the agent stays in passthrough so the next
  intercept needs no rollout): reported, fine. When the agent says its last intercepts were
  abandoned (their client was killed, a laptop closed, and nobody came back), it is a change
  nobody is using: a failure, and ``--fix`` restores the workload (`tpenv uninstall --agent`).
  Webhook-injected agents are the workload's own choice: never touched.
- **broken Services**: a Service whose named ``targetPort`` (``tpenv-8080``, or a name tpenv
  handed to the agent) is a port none of its pods has any more: every request to it fails.
  ``--fix`` puts the Service back from tpenv's restore record, else from the number in
  ``tpenv-<n>`` (tpenv.engine.strayports, shared with ``uninstall``'s sweep).

The probes (a round trip through a tunnel, a DNS lookup) live in probes.py.
"""
from __future__ import annotations

from tpenv.engine.agentquery import agent_inventory, auth_material
from tpenv.engine.agent_removal import (has_agent, injected_workloads, prune_agent_history, remove_agent,
                                        wait_agent_gone)
from tpenv.engine.agents import webhook_mode
from tpenv.engine.doctor import FAIL, OK, WARN, Check, Outcome
from tpenv.engine.strayports import find_stray_services, patch_command, repair_stray
from tpenv.errors import NotFound
from tpenv.kits.kube import Kube
from tpenv.settings import Settings


def idle_agents(kube: Kube, namespace: str, settings: Settings) -> Check:
    async def check() -> Outcome:
        workloads = [w for w in await injected_workloads(kube, namespace) if has_agent(w.obj) and not webhook_mode(w)]
        if not workloads:
            return Outcome(OK, f"no agent injected by tpenv in {namespace!r}")
        material = await auth_material(kube, namespace)
        idle, kept, busy, unknown = [], [], [], []
        for w in workloads:
            inventory = await agent_inventory(kube, w, material, settings.agent.ssh_port)
            if isinstance(inventory, str):
                unknown.append(f"{w.ref} ({inventory})")
            elif inventory[0]:
                busy.append(f"{w.ref} ({len(inventory[0])} intercept(s))")
            elif inventory[1]:
                idle.append(w)
            else:
                kept.append(w.ref)
        if not idle:
            detail = ", ".join(busy) or "none idle"
            if kept:
                detail += (f"; kept in passthrough after a leave, as designed: {', '.join(kept)} "
                           f"(`tpenv uninstall --agent` removes one)")
            if unknown:
                return Outcome(WARN, f"could not ask {', '.join(unknown)}; in use: {detail}",
                               fix=f"kubectl -n {namespace} get pods -l tpenv.io/agent")
            return Outcome(OK, f"no agent abandoned: {detail}")

        async def remove() -> list[str]:
            changed = []
            for w in idle:
                try:
                    if await remove_agent(kube, w):
                        changed.append(f"removed the agent from {namespace}/{w.ref} (workload and Service restored)")
                    await wait_agent_gone(kube, w, timeout=float(settings.kube.rollout_timeout))
                    await prune_agent_history(kube, await kube.reload(w))
                except NotFound:
                    continue
            return changed
        refs = ", ".join(w.ref for w in idle)
        return Outcome(FAIL, f"agent(s) no session uses (their client is gone): {refs}",
                       fix=" && ".join(f"tpenv uninstall --agent {w.ref} -n {namespace}" for w in idle),
                       repair=remove)
    return check


def broken_services(kube: Kube, namespace: str) -> Check:
    async def check() -> Outcome:
        count, found = await find_stray_services(kube, namespace)
        if not found:
            return Outcome(OK, f"{count} Service(s) in {namespace!r}: every named targetPort exists on "
                               "their pods")
        fixes = []
        for s in found:
            if s.target is not None:
                fixes.append(patch_command(namespace, s.service, s.target))
            else:
                fixes.append(f"kubectl -n {namespace} edit service {s.name}   (set targetPort of "
                             f"{', '.join(s.broken)} to a port its pods have)")

        async def put_back() -> list[str]:
            return await repair_stray(kube, found)
        detail = "; ".join(f"service/{s.name} targets port {', '.join(s.broken)}, which none of its pods has "
                           "(every request to it fails)" for s in found)
        repairable = any(s.target is not None for s in found)
        return Outcome(FAIL, detail, fix=" && ".join(dict.fromkeys(fixes)), repair=put_back if repairable else None)
    return check


def leftover_checks(kube: Kube, namespace: str, settings: Settings) -> list[tuple[str, Check]]:
    return [("cluster/idle-agents", idle_agents(kube, namespace, settings)),
            ("cluster/service-ports", broken_services(kube, namespace))]

