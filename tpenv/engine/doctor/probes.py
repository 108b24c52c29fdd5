"""Doctor's end-to-end probes, timed: a round trip through a tunnel, and a DNS lookup through the
manager's relay.

The tunnel probe wants bytes back, not only a stream opened (an opened port-forward stream
proves the API server and the kubelet took it, not that anything came through). In order:

1. an agent in the namespace: SSH to it over the port-forward and one request (what every
   intercept does first);
2. else a ready pod's TCP port in the namespace: a port-forward stream, ``HEAD / HTTP/1.0`` sent,
   the first byte of any answer awaited (HTTP servers answer it; most others answer garbage with
   an error or speak first). Only the user's own namespace, only the cluster's own pods;
3. else the manager, when one runs and you may reach it: SSH to its relay over the port-forward
   and one lookup;
4. else the stream that opened is said as such: "no round trip", never passed off as one; when
   not one stream opens (no right to port-forward, a kubelet that refuses), the probe fails.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from tpenv.engine.agent_removal import has_agent, injected_workloads
from tpenv.engine.agentquery import agent_round_trip, auth_material
from tpenv.engine.doctor import FAIL, OK, SKIP, Check, Outcome
from tpenv.errors import Forbidden, NotFound, TpenvError
from tpenv.kits.kube import Kube, What, pod_is_ready

if TYPE_CHECKING:
    from tpenv.kits.portforward import PodTunnel
from tpenv.settings import Settings

PROBE = b"HEAD / HTTP/1.0\r\n\r\n"
ANSWER_TIMEOUT = 5.0  # per pod port: a server that says nothing within this is not the one to time
MAX_PORTS = 3  # pod ports tried before falling back (3 x 5s stays well inside the check's timeout)


async def _agent_trip(kube: Kube, namespace: str, settings: Settings) -> str | None:
    agents = [w for w in await injected_workloads(kube, namespace) if has_agent(w.obj)]
    material = await auth_material(kube, namespace) if agents else None
    for w in agents if material is not None else []:
        try:
            pod, seconds = await agent_round_trip(kube, w, material, settings.agent.ssh_port)
        except TpenvError:
            continue
        return f"SSH round trip to the agent of {w.ref} (pod {pod}) over port-forward: {seconds * 1000:.0f} ms"
    return None


async def pod_round_trip(tunnel: PodTunnel, port: int) -> tuple[float | None, float, str]:
    """(seconds to the first byte back or None, seconds to open the stream, why none came)."""
    start = time.monotonic()
    reader, writer = await tunnel.open_stream(port)
    opened = time.monotonic() - start
    try:
        writer.write(PROBE)
        await writer.drain()
        async with asyncio.timeout(ANSWER_TIMEOUT):
            first = await reader.read(1)
        if first:
            return time.monotonic() - start, opened, ""
        return None, opened, "it closed without a byte"
    except TimeoutError:
        return None, opened, f"no byte within {ANSWER_TIMEOUT:g}s"
    except (OSError, TpenvError) as e:
        return None, opened, str(e)
    finally:
        writer.close()


async def _relay_trip(kube: Kube) -> str | None:
    from tpenv.kits.relay_client import RelaySession, find_manager_pod

    try:
        await find_manager_pod(kube)
        start = time.monotonic()
        async with RelaySession(kube) as relay:
            await relay.resolve("kubernetes.default.svc")
            return (f"SSH round trip to the manager's relay (pod {relay.pod}) over port-forward: "
                    f"{(time.monotonic() - start) * 1000:.0f} ms")
    except TpenvError:
        return None


def tunnel_probe(kube: Kube, namespace: str, settings: Settings) -> Check:
    async def check() -> Outcome:
        said = await _agent_trip(kube, namespace, settings)
        if said:
            return Outcome(OK, said)
        pods = [p for p in (await kube.call(kube.core.list_namespaced_pod, namespace,
                                            what=What("list", "pods", namespace)))["items"] if pod_is_ready(p)]
        ported = [(p["metadata"]["name"], port["containerPort"]) for p in pods
                  for c in p["spec"]["containers"] for port in c.get("ports") or []
                  if port.get("protocol", "TCP") == "TCP"][:MAX_PORTS]
        silent: list[str] = []
        refused: TpenvError | OSError | None = None
        from tpenv.kits.portforward import PodTunnel

        for pod, port in ported:
            tunnel = PodTunnel(kube, namespace, pod)
            try:
                answered, opened, why = await pod_round_trip(tunnel, port)
            except (OSError, TpenvError) as e:  # no stream to this port: the next one may take one
                refused = e
                continue
            finally:
                tunnel.close()
                await tunnel.wait_closed()
            if answered is not None:
                return Outcome(OK, f"round trip through a port-forward to pod {pod} port {port} (HEAD / sent, "
                                   f"first byte back): {answered * 1000:.0f} ms; stream opened in "
                                   f"{opened * 1000:.0f} ms")
            silent.append(f"{pod}:{port} (stream opened in {opened * 1000:.0f} ms; {why})")
        said = await _relay_trip(kube)
        if said:
            return Outcome(OK, said)
        if silent:
            return Outcome(OK, f"port-forward stream opened, no round trip: {'; '.join(silent)}, and no agent or "
                               "manager to answer")
        if refused is not None:  # pods to reach, and not one stream opened: the tunnel itself is broken
            return Outcome(FAIL, f"no port-forward stream to {', '.join(f'{p}:{n}' for p, n in ported)} could be "
                                 f"opened: {refused}", fix=getattr(refused, "hint", None))
        return Outcome(SKIP, f"no agent, no ready pod with a TCP port in {namespace!r} and no manager to "
                             "open a tunnel to")
    return check


def dns_probe(kube: Kube) -> Check:
    async def check() -> Outcome:
        from tpenv.kits.relay_client import RelaySession, find_manager_pod

        try:
            await find_manager_pod(kube)
        except Forbidden:
            return Outcome(SKIP, "you may not list the manager's pods (namespace tpenv): no relay to ask")
        except NotFound:
            return Outcome(SKIP, "no ready manager: cluster names are looked up through its relay "
                                 "(`tpenv manager install`)")
        start = time.monotonic()
        async with RelaySession(kube) as relay:
            answer = await relay.resolve("kubernetes.default.svc")
        seconds = time.monotonic() - start
        return Outcome(OK, f"kubernetes.default.svc -> {', '.join(answer.get('addresses') or [])} through the "
                           f"relay in {seconds * 1000:.0f} ms")
    return check


def probe_checks(kube: Kube, namespace: str, settings: Settings) -> list[tuple[str, Check]]:
    return [("e2e/tunnel", tunnel_probe(kube, namespace, settings)), ("e2e/dns", dns_probe(kube))]
