"""``tpenv leave --force``: end an intercept another user holds, from any machine.

A plain ``leave`` asks this machine's session to stop. The intercept of a colleague who went
home with their laptop asleep (and whose lease keeps being renewed by a process still alive on
it), or of a session on another machine, cannot be reached that way: this asks the agents
directly. Every ready pod of the workload runs its own agent with its own registry, so each is
told.

The agent decides, not this code: it ends another user's intercept only when the cluster says
the caller may ``force`` ``intercepts.tpenv.io`` in the namespace (SelfSubjectAccessReview with
the caller's own bearer token, agent/tpenv_agent/identity.py). Without that right the agent's
refusal (``Forbidden``, naming the missing right) reaches the user as is.
"""
from __future__ import annotations

from typing import Any

from tpenv.engine.agentquery import agent_intercepts, auth_material
from tpenv.engine.statusd import new_session_id
from tpenv.errors import NotFound, PermanentError, UsageError
from tpenv.kits.agent_client import AgentSession
from tpenv.kits.kube import Kube, Workload
from tpenv.kits.portforward import PodTunnel
from tpenv.engine.injection import runs_agent
from tpenv_agent.inject import AUTH_SECRET


def matching(held: list[dict[str, Any]], wanted: str) -> list[str]:
    """Intercept ids of ``held`` that ``wanted`` names: the full id (``<session>:<name>``, as
    ``tpenv list`` prints it) or, when that is unambiguous, the bare name."""
    ids = sorted({i["intercept_id"] for i in held if i.get("intercept_id")})
    if wanted in ids:
        return [wanted]
    return [i for i in ids if i.split(":", 1)[-1] == wanted]


async def find_held(kube: Kube, namespace: str, wanted: str, ssh_port: int) -> tuple[Workload, str, dict]:
    """(workload, intercept id, its description) of the one intercept ``wanted`` names."""
    material = await auth_material(kube, namespace)
    if material is None:
        raise PermanentError(f"cannot read Secret {AUTH_SECRET} in namespace {namespace}: no agent to ask",
                             hint="you need `get` on that Secret (the same right an intercept needs)")
    found: list[tuple[Workload, str, dict]] = []
    for w in await kube.list_workloads(namespace):
        if not any(runs_agent(p) for p in await kube.ready_pods(w)):
            continue
        held = await agent_intercepts(kube, w, material, ssh_port)
        if isinstance(held, str):
            continue
        by_id = {i["intercept_id"]: i for i in held}
        found += [(w, iid, by_id[iid]) for iid in matching(held, wanted)]
    if not found:
        raise NotFound(f"no intercept {wanted!r} in namespace {namespace}",
                       hint=f"`tpenv list -n {namespace}` shows every intercept and its id")
    if len({iid for _, iid, _ in found}) > 1:
        raise UsageError(f"{wanted!r} names several intercepts: {', '.join(sorted({i for _, i, _ in found}))}",
                         hint="give the full intercept id")
    return found[0]


async def force_leave(kube: Kube, namespace: str, wanted: str, ssh_port: int) -> dict[str, Any]:
    """End intercept ``wanted`` on every ready pod of its workload; its description, plus the pods."""
    w, iid, described = await find_held(kube, namespace, wanted, ssh_port)
    material = await auth_material(kube, namespace)
    assert material is not None  # find_held read it
    pods = [p["metadata"]["name"] for p in await kube.ready_pods(w) if runs_agent(p)]
    ended = []
    for pod in pods:
        tunnel = PodTunnel(kube, namespace, pod)
        try:
            async with AgentSession(f"force-{new_session_id()}", ca_key=material["ca_key"],
                                    host_key_pub=material["host_key.pub"], host=pod, port=ssh_port, tunnel=tunnel,
                                    connect_timeout=10, token=kube.bearer_token()) as session:
                try:
                    await session.leave(iid, intercept_id=iid, force=True)
                except NotFound:
                    continue  # this pod's agent never had it (a pod started after the intercept)
                ended.append(pod)
        finally:
            tunnel.close()
            await tunnel.wait_closed()
    return {**described, "workload": w.ref, "namespace": namespace, "pods": ended}


__all__ = ["force_leave", "find_held", "matching"]
