"""After an injecting rollout: "ready" once the node routes new connections to the agents.

endpoints.py waits until the EndpointSlices list only the agents' pods; kube-proxy programs each
node from them a moment later. :func:`wait_routed` then proves it from inside the cluster
(tpenv/kits/routeprobe.py): from one agent pod per node, fresh connections to the Service's
ClusterIP and port must all reach agents, over the control channels the tunnels already hold.
Bounded by ``kube.endpoints_timeout``: past it tpenv says so and goes on (traffic still flows,
some new connections to the departed pods until kube-proxy catches up), as endpoints.py does.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tpenv.kits.aio import unit_logger
from tpenv.kits.routeprobe import FEATURE, prove_routed

if TYPE_CHECKING:
    from tpenv.engine.intercepts import InterceptRun

PROBES_PER_AGENT, PROBES_MAX = 8, 64


def probe_count(agents: int) -> int:
    """Probes per dial. kube-proxy picks an endpoint at random per connection, so while one old
    pod is still in a node's rules with ``agents`` new ones, every probe misses it with
    n/(n+1): 8 per agent pod and 8 more make all of them miss it less than 1 in 5000 up to 7
    agent pods (1 in 65536 for one); the count stops at 64 (1 in 1900 at 8 pods, more beyond)."""
    return min(PROBES_MAX, PROBES_PER_AGENT * (agents + 1))


def probers_by_node(pods: dict[str, dict[str, Any]]) -> list[str]:
    """One pod per node (the first by name): a node's kube-proxy routes the same for all of its pods."""
    chosen: dict[str, str] = {}
    for name in sorted(pods):
        node = (pods[name].get("spec") or {}).get("nodeName") or f"pod {name}"
        chosen.setdefault(node, name)
    return sorted(chosen.values())


async def wait_routed(run: "InterceptRun", progress: Callable[[str], None] | None) -> bool:
    """True once proved, or when there is nothing to prove (a headless Service); False when it
    could not be proved in time, said on ``progress``."""
    assert run.resolved is not None
    log = unit_logger("intercept", run.intercept.name or run.intercept.workload)
    service, sp = run.resolved.service, run.resolved.service_port
    name = service["metadata"]["name"]
    ip = (service.get("spec") or {}).get("clusterIP")
    if not ip or ip == "None":
        return True  # headless: callers dial the pods, which the in-pod redirect covers
    sessions = {}
    for key, unit in run.registry.units.items():
        if unit.session is not None and not unit.session.closed.is_set():
            sessions[key[2]] = unit.session
    old = sorted(p for p, s in sessions.items() if FEATURE not in (s.info.get("features") or []))
    if old or not sessions:
        if progress:
            progress(f"Service {name}: cannot check that the node routes to the agents "
                     f"({'the agent of ' + ', '.join(old) + ' is too old' if old else 'no agent session'})")
        return False
    pods = {p["metadata"]["name"]: p for p in run.ready_pods()}
    probers = probers_by_node({p: pods.get(p, {}) for p in sessions})

    def agents() -> tuple[dict[str, Any], list[Any]]:
        live = {p: s for p, s in sessions.items() if not s.closed.is_set()}
        return {p: live[p] for p in probers if p in live}, list(live.values())

    within = run.settings.kube.endpoints_timeout
    start = time.monotonic()
    ok, why, rounds = await prove_routed(agents, ip, int(sp["port"]), within=within,
                                         count=probe_count(len(sessions)))
    took = time.monotonic() - start
    if ok:
        log.info("Service %s (%s:%s) routes new connections to the agents: proved from %s in %.2fs, %d round(s)",
                 name, ip, sp["port"], ", ".join(probers), took, rounds)
        return True
    if progress:
        progress(f"Service {name}: new connections to {ip}:{sp['port']} did not all reach the agents within "
                 f"{within:.0f}s ({why}); setting kube.endpoints_timeout")
    return False
