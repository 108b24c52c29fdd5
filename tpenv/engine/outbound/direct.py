"""Direct paths: a connection to a Service's ClusterIP (or to one of its endpoint pods) carried on
its own port-forward stream straight to a ready endpoint pod, as ``kubectl port-forward svc/x``
does, instead of a ``direct-tcpip`` channel of the relay's one SSH connection. The API server
authenticates the stream and the kubelet dials the pod: no second encryption, no hop through the
manager pod, no stream shared by every connection (docs/performance.md "connect": the relay path
added 2.4 ms per request and carried a third of port-forward's bulk).

It gives nobody more than they have: it is used in a namespace only when the user may create
``pods/portforward`` there (one SelfSubjectAccessReview per namespace at start) and list/watch its
Services and EndpointSlices, and only towards endpoint addresses that ``allowed`` accepts (the
relay's own ranges minus ``never_proxy``: a hostNetwork pod's endpoint is a node address and stays
with the relay, which refuses it). Anything else (an address no Service of these namespaces has,
a Service without selector, a namespace without the right, every direct attempt failing) goes
through the relay as before.

Each connection picks a ready endpoint at random (per-connection balancing, as kube-proxy), from
a view kept current by one Service and one EndpointSlice watch per namespace. After a stream to
``(pod, port)`` is used, one spare is opened for it, so that the next connection does not wait
for a WebSocket upgrade; a spare is dropped unused after ``SPARE_SECONDS`` (it is an open
connection to the app, and servers that speak first time out idle handshakes).
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tpenv.errors import Forbidden, TpenvError
from tpenv.kits.kube import Kube, What
from tpenv.kits.kuberest import ApiGroup
from tpenv.kits.portforward import PodTunnel
from tpenv.kits.splice import CHUNK

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
SPARE_SECONDS = 5.0
ATTEMPTS = 3  # endpoints tried for one connection before handing it to the relay
SERVICE_LABEL = "kubernetes.io/service-name"
LINGER_AFTER_EOF = 30.0  # seconds the pod's answer has after the client's EOF (no half-close)


class _EofClosingWriter(asyncio.StreamWriter):
    """A WebSocket port-forward (v4) cannot pass a half-close on: after the client's EOF, the
    stream would stay open until the app's idle timeout (a keep-alive HTTP server: forever), one
    stream through the API server per finished connection. So the client's EOF gives the pod's
    answer ``LINGER_AFTER_EOF`` seconds, then the stream closes. SPDY (the fallback) half-closes."""

    _linger: asyncio.TimerHandle | None = None

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.transport.can_write_eof():
            super().write_eof()
        elif self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(LINGER_AFTER_EOF, self.close)

    def close(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
        super().close()


async def open_stream(tunnel: PodTunnel, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``tunnel.open_stream`` with the EOF handling above and splice's read size as buffer."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=CHUNK, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await tunnel.create_connection(lambda: protocol, tunnel.pod, port)
    return reader, _EofClosingWriter(transport, protocol, reader, loop)


@dataclass
class NamespaceView:
    """The Services and EndpointSlices of one namespace, as the watches last said."""

    namespace: str
    services: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> Service
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)  # slice name -> EndpointSlice

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        into = self.services if obj.get("kind") == "Service" else self.slices
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            into.pop(name, None)
        else:
            into[name] = obj


def endpoints_for(view: NamespaceView, ip: Address, port: int,
                  allowed: Callable[[Address], bool]) -> list[tuple[str, int]] | None:
    """``(pod, pod port)`` candidates for a connection to ``ip:port`` (pure): the ready endpoints
    of the Service whose ClusterIP is ``ip`` (its port ``port`` resolved per endpoint slice), or
    the endpoint pod whose address is ``ip``. None when ``ip`` is not this namespace's (the
    relay takes it); an empty list when it is but nothing is ready or allowed."""
    text = str(ip)
    for svc in view.services.values():
        spec = svc.get("spec") or {}
        if text not in (spec.get("clusterIPs") or [spec.get("clusterIP")]):
            continue
        sp = next((p for p in spec.get("ports") or [] if p.get("port") == port
                   and (p.get("protocol") or "TCP") == "TCP"), None)
        if sp is None or not spec.get("selector"):
            return None  # no such port (the relay says so), or endpoints managed by hand
        wanted, name = sp.get("name") or "", svc["metadata"]["name"]
        found: set[tuple[str, int]] = set()
        for s in view.slices.values():
            if (s["metadata"].get("labels") or {}).get(SERVICE_LABEL) != name:
                continue
            number = next((p.get("port") for p in s.get("ports") or [] if (p.get("name") or "") == wanted), None)
            for ep in s.get("endpoints") or [] if number is not None else []:
                ref = ep.get("targetRef") or {}
                if ref.get("kind") == "Pod" and (ep.get("conditions") or {}).get("ready") is not False \
                        and ep.get("addresses") and all(_allowed(a, allowed) for a in ep["addresses"]):
                    found.add((ref["name"], int(number)))
        return sorted(found)
    for s in view.slices.values():
        for ep in s.get("endpoints") or []:
            ref = ep.get("targetRef") or {}
            if ref.get("kind") == "Pod" and text in (ep.get("addresses") or []):
                return [(ref["name"], port)] if allowed(ip) else None
    return None


def _allowed(address: str, allowed: Callable[[Address], bool]) -> bool:
    try:
        return allowed(ipaddress.ip_address(address))
    except ValueError:
        return False


class DirectPaths:
    """``start()``, ``dial(ip, port)``; ``close()`` safe twice, then ``wait_closed()``."""

    def __init__(self, kube: Kube, namespaces: list[str], allowed: Callable[[Address], bool],
                 log: logging.Logger | logging.LoggerAdapter) -> None:
        self.kube, self.namespaces, self.allowed, self.log = kube, list(dict.fromkeys(namespaces)), allowed, log
        self.views: dict[str, NamespaceView] = {}
        self.skipped: dict[str, str] = {}  # namespace -> why it goes through the relay
        self.stats = {"direct": 0, "relay": 0, "spare": 0}
        self._tunnels: dict[tuple[str, str], PodTunnel] = {}
        self._spares: dict[tuple[str, str, int], tuple[Any, Any, asyncio.TimerHandle]] = {}
        self._filling: set[tuple[str, str, int]] = set()
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    async def start(self) -> "DirectPaths":
        for ns in self.namespaces:
            try:
                if not await self._may_port_forward(ns):
                    self.skipped[ns] = "no right to create pods/portforward"
                    continue
                view = NamespaceView(ns)
                for lister, what in ((self.kube.core.list_namespaced_service, "services"),
                                     (self.kube.discovery.list_namespaced_endpoint_slice, "endpointslices")):
                    listed = await self.kube.call(lister, ns, what=What("list", what, ns))
                    for obj in listed.get("items") or []:
                        obj.setdefault("kind", "Service" if what == "services" else "EndpointSlice")
                        view.apply("ADDED", obj)
                    self._spawn(self._follow(view, lister, what, (listed.get("metadata") or {}).get("resourceVersion")))
                self.views[ns] = view
            except TpenvError as e:  # a right missing (list, watch): this namespace keeps the relay
                self.skipped[ns] = str(e)
        for ns, why in self.skipped.items():
            self.log.info("namespace %s: connections go through the relay (%s)", ns, why)
        if self.views:
            self.log.info("direct port-forward streams to endpoint pods in %s", ", ".join(self.views))
        return self

    async def _may_port_forward(self, ns: str) -> bool:
        # Asked here, not through the doctor's can_i: that module needs the agent package, which
        # a plain install of the client does not have.
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": {"namespace": ns, "verb": "create", "resource": "pods",
                                                  "subresource": "portforward"}}}
        try:
            answer = await self.kube.call(ApiGroup(self.kube.api, "/apis/authorization.k8s.io/v1")
                                          .create_self_subject_access_review, review,
                                          what=What("create", "selfsubjectaccessreviews"))
        except Forbidden:  # may not even ask: treat as no
            return False
        return bool((answer.get("status") or {}).get("allowed"))

    async def _follow(self, view: NamespaceView, lister: Any, what: str, rv: str | None) -> None:
        """Keep ``view`` current; a watch that ends for good leaves this namespace to the relay."""
        kind = "Service" if what == "services" else "EndpointSlice"
        try:
            async with self.kube.watch(lister, view.namespace, resource_version=rv,
                                       what=What("watch", what, view.namespace)) as events:
                async for event, obj in events:
                    obj.setdefault("kind", kind)
                    view.apply(event, obj)
        except TpenvError as e:
            self.log.warning("watch of %s in %s ended (%s): its connections go through the relay",
                             what, view.namespace, e)
            self.views.pop(view.namespace, None)

    # --- dialling ------------------------------------------------------------------------------
    def route(self, ip: Address, port: int) -> tuple[str, list[tuple[str, int]]] | None:
        for ns, view in self.views.items():
            found = endpoints_for(view, ip, port, self.allowed)
            if found is not None:
                return ns, found
        return None

    async def dial(self, ip: Address, port: int) -> tuple[Any, Any] | None:
        """A stream to a ready endpoint behind ``ip:port``; None when the relay is to carry it."""
        routed = self.route(ip, port) if not self._closed else None
        if not routed or not routed[1]:
            self.stats["relay"] += 1
            return None
        ns, candidates = routed
        for pod, pod_port in random.sample(candidates, min(ATTEMPTS, len(candidates))):
            key = (ns, pod, pod_port)
            stream = self._take_spare(key)
            if stream is None:
                try:
                    stream = await open_stream(self._tunnel(ns, pod), pod_port)
                except TpenvError as e:  # a pod going away can still be listed a moment
                    self.log.info("port-forward to %s/%s:%s refused (%s); trying another", ns, pod, pod_port, e)
                    continue
            self.stats["direct"] += 1
            self._refill(key)
            return stream
        self.stats["relay"] += 1
        return None

    def _tunnel(self, ns: str, pod: str) -> PodTunnel:
        tunnel = self._tunnels.get((ns, pod))
        if tunnel is None:
            tunnel = self._tunnels[(ns, pod)] = PodTunnel(self.kube, ns, pod)
        return tunnel

    def _take_spare(self, key: tuple[str, str, int]) -> tuple[Any, Any] | None:
        spare = self._spares.pop(key, None)
        if spare is None:
            return None
        reader, writer, timer = spare
        timer.cancel()
        if writer.transport.is_closing() or reader.at_eof() or reader.exception() is not None:
            writer.close()  # the app or the kubelet ended it meanwhile
            return None
        self.stats["spare"] += 1
        return reader, writer

    def _refill(self, key: tuple[str, str, int]) -> None:
        if key in self._spares or key in self._filling or self._closed:
            return
        self._filling.add(key)

        async def fill() -> None:
            try:
                reader, writer = await open_stream(self._tunnel(key[0], key[1]), key[2])
            except TpenvError:
                return  # the next connection opens its own
            finally:
                self._filling.discard(key)
            if self._closed or key in self._spares:
                writer.close()
                return
            timer = asyncio.get_running_loop().call_later(SPARE_SECONDS, self._expire, key)
            self._spares[key] = (reader, writer, timer)

        self._spawn(fill())

    def _expire(self, key: tuple[str, str, int]) -> None:
        spare = self._spares.pop(key, None)
        if spare is not None:
            spare[1].close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for key in list(self._spares):
            self._expire(key)
        for tunnel in self._tunnels.values():
            tunnel.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for tunnel in list(self._tunnels.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(tunnel.wait_closed(), 5)


__all__ = ["DirectPaths", "NamespaceView", "endpoints_for"]
