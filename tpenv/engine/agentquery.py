"""Asking a workload's agent what it holds: one short SSH session to one ready pod.

Used by `tpenv list` (who intercepts what) and `tpenv doctor` (agents no session uses). The
answer comes from the agent itself (its ``list`` op: every session, from any machine), so it
is true for intercepts made elsewhere too.
"""
from __future__ import annotations

import base64
import time
from typing import Any

from tpenv.engine.injection import AUTH_KEYS
from tpenv.engine.statusd import new_session_id
from tpenv.errors import TpenvError
from tpenv.kits.kube import Kube, What, Workload
from tpenv.engine.injection import runs_agent
from tpenv_agent.inject import AUTH_SECRET


async def auth_material(kube: Kube, namespace: str) -> dict[str, bytes] | None:
    """The keys of Secret tpenv-auth in ``namespace``, or None when it cannot be read."""
    try:
        secret = await kube.call(kube.core.read_namespaced_secret, AUTH_SECRET, namespace,
                                 what=What("get", "secrets", namespace, AUTH_SECRET))
        return {k: base64.b64decode(secret["data"][k]) for k in AUTH_KEYS}
    except (TpenvError, KeyError):
        return None


async def agent_pod(kube: Kube, w: Workload) -> str | None:
    pods = [p for p in await kube.ready_pods(w)
            if runs_agent(p)]
    return pods[0]["metadata"]["name"] if pods else None


async def agent_intercepts(kube: Kube, w: Workload, material: dict[str, bytes] | None,
                           ssh_port: int) -> list[dict[str, Any]] | str:
    """Every intercept the agent of one ready pod of ``w`` holds, or why it could not be asked."""
    inventory = await agent_inventory(kube, w, material, ssh_port)
    return inventory if isinstance(inventory, str) else inventory[0]


async def agent_inventory(kube: Kube, w: Workload, material: dict[str, bytes] | None,
                          ssh_port: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | str:
    """(held, abandoned) of the agent of one ready pod of ``w``, or why it could not be asked:
    the intercepts it holds, and those that ended because their client vanished since its last
    intercept (docs/protocol.md, ``list``; empty from an agent older than that record)."""
    if material is None:
        return f"cannot read Secret {AUTH_SECRET}"
    pod = await agent_pod(kube, w)
    if pod is None:
        return "no ready pod with the agent"
    from tpenv.kits.agent_client import AgentSession  # asyncssh: only once an agent is asked
    from tpenv.kits.portforward import PodTunnel

    tunnel = PodTunnel(kube, w.namespace, pod)
    try:
        async with AgentSession(f"list-{new_session_id()}", ca_key=material["ca_key"],
                                host_key_pub=material["host_key.pub"], host=pod, port=ssh_port, tunnel=tunnel,
                                token=kube.bearer_token()) as session:
            answer = await session.request("list")
            return answer["intercepts"], answer.get("abandoned") or []
    except TpenvError as e:
        return f"agent unreachable: {e}"
    finally:
        tunnel.close()


async def agent_round_trip(kube: Kube, w: Workload, material: dict[str, bytes], ssh_port: int) -> tuple[str, float]:
    """(pod, seconds) of an SSH hello and one request through the port-forward to the agent."""
    pod = await agent_pod(kube, w)
    if pod is None:
        raise TpenvError(f"no ready pod of {w.ref} runs the agent")
    from tpenv.kits.agent_client import AgentSession
    from tpenv.kits.portforward import PodTunnel

    tunnel = PodTunnel(kube, w.namespace, pod)
    start = time.monotonic()
    try:
        async with AgentSession(f"doctor-{new_session_id()}", ca_key=material["ca_key"],
                                host_key_pub=material["host_key.pub"], host=pod, port=ssh_port, tunnel=tunnel,
                                token=kube.bearer_token()) as session:
            await session.list()
            return pod, time.monotonic() - start
    finally:
        tunnel.close()
