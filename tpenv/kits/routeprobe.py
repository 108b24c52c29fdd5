"""Proving from inside the cluster that a Service's ClusterIP sends new connections to agents.

The EndpointSlices say where a Service should route; each node's kube-proxy applies them a
moment later (iptables ``minSyncPeriod``). A round here asks what the node actually does: every
agent opens a probe watch, one agent (the *prober*) dials the ClusterIP on ``count`` fresh
connections, every agent says which probes it saw (the agent's side and the wire:
agent/tpenv_agent/routeprobe.py, docs/protocol.md §3.1). :func:`judge` (pure) decides; a
probe that reached no agent went to a pod without one (a departed pod, or a draining one whose
app still accepts), so :func:`prove_routed` tries again, with backoff, until a deadline.

Each prober proves its own node's rules: pick one per node of the agents' pods. Nodes without
an agent pod are not probed (their kube-proxy may still lag; docs/design.md says so).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from tpenv.errors import TpenvError
from tpenv.kits.aio import Backoff

FEATURE = "route-probe"  # in an agent's hello features when it serves the probe ops
PROBE_TIMEOUT = 1.0  # seconds for one probe's connect: a departed pod's address never answers


class Agent(Protocol):
    async def request(self, op: str, **fields: Any) -> dict[str, Any]: ...


def judge(probes: list[dict[str, Any]], seen: list[list[Any]]) -> str | None:
    """None when every probe of one dial reached an agent, else why not.

    ``probes``: the prober's ``probe-dial`` answer; ``seen``: every agent's ``probe-seen``
    answer of the same watch, together. A seen peer that is some probe's local address is that
    probe; the others were SNATed on the way (a pod reaching itself through its Service gets a
    new source address and port), and only this dial's probes carry the mark during the watch,
    so they are counted against the probes not matched by address."""
    if not probes:
        return "the prober sent no probe"
    failed = [p for p in probes if not p.get("ok")]
    if failed:
        return (f"{len(failed)} of {len(probes)} probes failed ({failed[0].get('error') or 'no reason'}): "
                f"the node still sends some new connections to a pod without the agent")
    mine = {tuple(p["local"]) for p in probes if p.get("local")}
    peers = [tuple(s) for s in seen]
    matched = mine & set(peers)
    snatted = sum(1 for s in peers if s not in mine)
    missing = len(probes) - len(matched) - snatted
    if missing > 0:
        return (f"{missing} of {len(probes)} probes reached no agent: the node still sends some new "
                f"connections to a pod without the agent")
    return None


async def probe_round(prober: Agent, agents: list[Agent], host: str, port: int, *, count: int,
                      timeout: float = PROBE_TIMEOUT) -> str | None:
    """One dial from ``prober`` with every agent watching: :func:`judge`'s answer."""
    # The watch outlives the round a little, and ends by itself if this client vanishes.
    await asyncio.gather(*(a.request("probe-watch", seconds=timeout + 10) for a in agents))
    dialed = await prober.request("probe-dial", host=host, port=port, count=count, timeout=timeout)
    answers = await asyncio.gather(*(a.request("probe-seen") for a in agents))
    return judge(dialed["probes"], [s for answer in answers for s in answer["seen"]])


async def prove_routed(agents: Callable[[], tuple[dict[str, Agent], list[Agent]]], host: str, port: int, *,
                       within: float, count: int, backoff: Backoff | None = None) -> tuple[bool, str | None, int]:
    """Rounds until a round from every prober passed, or ``within`` seconds passed:
    (proved, why not, rounds). ``agents()`` gives the current (probers by name, every agent);
    asked again each round, so a dropped tunnel's session is not used again. A prober that
    passed is not asked again: a node that routes only to agents keeps doing so."""
    backoff = backoff or Backoff(0.05, 0.5)
    deadline = time.monotonic() + within
    passed: set[str] = set()
    why: str | None = None
    rounds = 0
    watching: list[Agent] = []
    try:
        while True:
            probers, watching = agents()
            todo = {n: p for n, p in probers.items() if n not in passed}
            if not probers:
                why = "no agent to probe from"
            for name, prober in todo.items():
                rounds += 1
                try:
                    failed = await asyncio.wait_for(probe_round(prober, watching, host, port, count=count),
                                                    max(deadline - time.monotonic(), 0.1))
                except (TpenvError, asyncio.TimeoutError) as e:
                    failed = f"{type(e).__name__}: {e}"
                if failed is None:
                    passed.add(name)
                else:
                    why = f"from pod {name}: {failed}"
            if probers and passed >= set(probers):
                return True, None, rounds
            delay = backoff.failed()
            if time.monotonic() + delay >= deadline:
                return False, why, rounds
            await asyncio.sleep(delay)  # a retry's backoff: kube-proxy tells nobody when it synced
    finally:
        # End the watches now rather than at their timeout (best effort: they end by themselves).
        await asyncio.gather(*(asyncio.wait_for(a.request("probe-watch", seconds=0), 2) for a in watching),
                             return_exceptions=True)
