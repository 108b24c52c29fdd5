"""After a rollout: until every Service in front of the intercepted port routes only to the new pods.

The rollout being done (every replica a Ready pod with the agent, no old pod left running) is not
"ready": the EndpointSlice controller lags behind it, and kube-proxy programs each node from the
slices after that. :func:`wait_endpoints` waits, on the EndpointSlice watch, until every Service
that selects the workload on the intercepted port lists as ready only the pods that carry the
agent (:func:`settled`, pure): the old pods' addresses gone, or kept as terminating and not ready
(kube-proxy sends nothing to those while a ready endpoint exists). The main Service must also
send the port to ``endpoint_port`` (the agent's, after a targetPort rewrite; the app's with the
in-pod redirect).

What the slices cannot show is each node's kube-proxy applying them (its iptables
``minSyncPeriod``, 1 s by default, batches updates): routeready.py then proves that from the
agents; docs/design.md "What ready means" says what was measured.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tpenv.kits.aio import unit_logger
from tpenv.kits.kube import Kube, What, Workload

Progress = Callable[[str], None]
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def _target(sp: dict[str, Any]) -> Any:
    return sp.get("targetPort", sp.get("port"))


def services_on_port(services: list[dict[str, Any]], main: dict[str, Any], sp: dict[str, Any],
                     names: set[str], app_port: int | None) -> list[dict[str, Any]]:
    """The main Service and every other one whose port reaches the intercepted container port:
    the same targetPort as ``sp`` (name or number), one of ``names`` (the agent's port name, the
    app's), or the app's port number."""
    main_name = main["metadata"]["name"]
    wanted = {str(_target(sp)), *names} | ({str(app_port)} if app_port is not None else set())
    out = [main]
    for s in services:
        if s["metadata"]["name"] == main_name:
            continue
        if any(str(_target(p)) in wanted for p in (s.get("spec") or {}).get("ports") or []):
            out.append(s)
    return out


def _ready(e: dict[str, Any]) -> bool:
    # The API: "nil should be interpreted as ready" (discovery.k8s.io/v1 EndpointConditions).
    return (e.get("conditions") or {}).get("ready") is not False


def settled(slices: dict[str, list[dict[str, Any]]], pods: set[str], main: str, slice_port: str,
            endpoint_port: int) -> str | None:
    """None when the slices route only to ``pods``; else why not (for the progress line).

    ``slices``: Service name -> its EndpointSlices; every Service in it is checked."""
    for svc, items in sorted(slices.items()):
        ready_new = 0
        for s in items:
            eps = s.get("endpoints") or []
            if svc == main and any(_ready(e) for e in eps):
                nums = [p.get("port") for p in s.get("ports") or [] if (p.get("name") or "") == slice_port]
                if any(n != endpoint_port for n in nums):
                    return f"Service {svc} still sends port {slice_port or nums} to {nums}, not {endpoint_port}"
            for e in eps:
                name = (e.get("targetRef") or {}).get("name")
                cond = e.get("conditions") or {}
                if name in pods:
                    ready_new += _ready(e)
                elif _ready(e) or not cond.get("terminating"):
                    addr = ",".join(e.get("addresses") or [])
                    return f"Service {svc} still lists pod {name} ({addr}) without the agent"
        if not ready_new:
            return f"Service {svc} lists no ready pod with the agent yet"
    return None


async def wait_endpoints(kube: Kube, w: Workload, service: dict[str, Any], sp: dict[str, Any], endpoint_port: int,
                         port_name: str, *, timeout: float, progress: Progress | None = None,
                         serves: Callable[[dict[str, Any]], bool] | None = None,
                         app_port: int | None = None) -> bool:
    """Until :func:`settled` holds for every Service on the intercepted port (driven by the
    EndpointSlice watch). False on timeout, said on ``progress``: not an error, traffic still
    flows (through the app directly) until the slices catch up."""
    from tpenv.engine.agents import pod_serves

    log = unit_logger("agent", f"{w.namespace}/{w.name}")
    if serves is None:
        serves = lambda p: pod_serves(p, port_name)  # noqa: E731
    main = service["metadata"]["name"]
    names = {port_name} | ({str(_target(sp))} if _target(sp) is not None else set())
    watched = services_on_port(await kube.services_for(w), service, sp, names, app_port)
    svc_names = sorted(s["metadata"]["name"] for s in watched)
    pods = {p["metadata"]["name"] for p in await kube.pods_of(w)
            if serves(p) and not p["metadata"].get("deletionTimestamp")}
    slices: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in svc_names}
    why: str | None = "no EndpointSlice seen yet"
    selector = f"{SERVICE_NAME_LABEL} in ({','.join(svc_names)})"
    try:
        async with asyncio.timeout(timeout):
            async with kube.watch(kube.discovery.list_namespaced_endpoint_slice, w.namespace,
                                  label_selector=selector,
                                  what=What("watch", "endpointslices.discovery.k8s.io", w.namespace)) as events:
                async for kind, s in events:
                    svc = (s["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL)
                    if svc not in slices:
                        continue
                    if kind == "DELETED":
                        slices[svc].pop(s["metadata"]["name"], None)
                    else:
                        slices[svc][s["metadata"]["name"]] = s
                    why = settled({k: list(v.values()) for k, v in slices.items()}, pods, main,
                                  sp.get("name") or "", endpoint_port)
                    if why is None:
                        log.info("endpoints of %s route only to the agent's pods", ", ".join(svc_names))
                        return True
    except TimeoutError:
        if progress:
            progress(f"Service {main}: its endpoints did not switch to the agents within {timeout:.0f}s ({why}); "
                     f"setting kube.endpoints_timeout")
        return False
    return False
