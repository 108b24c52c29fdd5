"""Forwards (``forwards:``): a cluster Service port reachable on a local port.

A forward is one reconciler unit, key ``("forward", ns, service, port)`` (then the context's
name, in a file with ``contexts:``). It listens on
``127.0.0.1:<local>`` and carries every accepted connection over its own port-forward stream
(``PodTunnel.open_stream``) to a ready pod behind the Service. Which pods are behind it comes
from the Service's EndpointSlices, kept current by a watch, so when the pod in use goes away
new connections go to another ready one without a restart of the unit. Connections already
open to a pod that goes away end with it, as they would with a ClusterIP.

Why not ``kubectl port-forward svc/x``: kubectl picks one pod at start and never moves.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


from tpenv.engine.units import Key, Notify, TaskUnit, hash_spec
from tpenv.errors import NotFound, TpenvError, TransientError
from tpenv.kits.kube import Kube, What
from tpenv.kits.portforward import PodTunnel
from tpenv.kits.splice import CHUNK as _CHUNK, splice as _splice
from tpenv.settings import TunnelSettings

_CONNECT_TIMEOUT = TunnelSettings().connect_timeout  # the documented default

_ATTEMPTS = 3  # pods tried for one accepted connection before giving up on it


def resolve_service_port(service: dict[str, Any], port: int | str) -> dict[str, Any]:
    """The Service's port entry for ``port`` (its number or its name)."""
    ports = (service.get("spec") or {}).get("ports") or []
    for sp in ports:
        if str(sp.get("port")) == str(port) or (sp.get("name") and sp.get("name") == str(port)):
            return sp
    name = (service.get("metadata") or {}).get("name")
    known = ", ".join(f"{p.get('name') or '-'}={p.get('port')}" for p in ports) or "none"
    raise NotFound(f"Service {name!r} has no port {port!r} (it has: {known})",
                   hint="use one of the Service's ports in forwards[].port")


def backends_from_slices(slices: Iterable[dict[str, Any]], service_port: dict[str, Any]) -> list[tuple[str, int]]:
    """``(pod name, pod port)`` for every ready endpoint of ``service_port``, sorted for stability.

    EndpointSlices carry the resolved target port per Service port *name* (empty for an
    unnamed single port), which covers named targetPorts that differ between pods.
    """
    wanted = service_port.get("name") or ""
    found: set[tuple[str, int]] = set()
    for s in slices:
        number = next((p.get("port") for p in s.get("ports") or [] if (p.get("name") or "") == wanted), None)
        if number is None:
            continue
        for ep in s.get("endpoints") or []:
            ref = ep.get("targetRef") or {}
            if ref.get("kind") != "Pod" or (ep.get("conditions") or {}).get("ready") is False:
                continue
            found.add((ref["name"], int(number)))
    return sorted(found)


class Backends:
    """The current ready pods of a Service port, fed by EndpointSlice events.

    ``pick()`` keeps using the same pod while it is ready (one pod at a time, like a
    port-forward, but movable), skipping pods that just failed a connection.
    """

    def __init__(self, service_port: dict[str, Any]) -> None:
        self.service_port = service_port
        self._slices: dict[str, dict[str, Any]] = {}
        self.pods: list[tuple[str, int]] = []
        self.current: tuple[str, int] | None = None
        self.changed = asyncio.Event()

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self._slices.pop(name, None)
        else:
            self._slices[name] = obj
        self.pods = backends_from_slices(self._slices.values(), self.service_port)
        self.changed.set()
        self.changed = asyncio.Event()

    def pick(self, exclude: set[tuple[str, int]] = frozenset()) -> tuple[str, int] | None:
        if self.current in self.pods and self.current not in exclude:
            return self.current
        candidates = [p for p in self.pods if p not in exclude]
        self.current = candidates[0] if candidates else None
        return self.current


@dataclass(frozen=True)
class ForwardSpec:
    kube: Kube = field(compare=False, repr=False)
    namespace: str
    service: str
    port: int | str
    local: int
    host: str = "127.0.0.1"
    connect_timeout: float = _CONNECT_TIMEOUT
    context: str | None = None  # the contexts: entry (None: the file's one unnamed context)

    @property
    def key(self) -> Key:
        key: Key = ("forward", self.namespace, self.service, str(self.port))
        return (*key, self.context) if self.context else key

    @property
    def spec_hash(self) -> str:
        # The Kube is not compared: a context whose entry now finds another cluster changes its
        # kube_context, which the factory folds in through `context_hash`.
        return hash_spec(self.namespace, self.service, str(self.port), self.local, self.host, self.context_hash)

    @property
    def context_hash(self) -> str | None:
        return self.kube.context if self.context else None

    @property
    def depends_on(self) -> frozenset[Key]:
        return frozenset()

    def create(self, notify: Notify) -> "ForwardUnit":
        return ForwardUnit(self, notify)


class ForwardUnit(TaskUnit):
    """Listens locally; each connection gets a port-forward stream to a ready backend pod."""

    def __init__(self, spec: ForwardSpec, notify: Notify) -> None:
        super().__init__(spec.key, spec.spec_hash, notify)
        self.spec = spec
        self.backends: Backends | None = None
        self.bound_port: int | None = None  # read back (local may be 0 in tests)
        self._conns: set[asyncio.Task] = set()
        # One PodTunnel per backend pod: over SPDY its streams share one session (one upgrade);
        # over WebSocket each stream is its own upgrade either way.
        self._tunnels: dict[str, PodTunnel] = {}

    async def run(self, stopping: asyncio.Event, ready: Callable[[], None]) -> None:
        s, kube = self.spec, self.spec.kube
        service = await kube.call(kube.core.read_namespaced_service, s.service, s.namespace,
                                  what=What("get", "services", s.namespace, s.service))
        self.backends = Backends(resolve_service_port(service, s.port))
        try:
            server = await asyncio.start_server(self._accept, s.host, s.local, limit=_CHUNK)
        except OSError as e:
            raise TpenvError(f"cannot listen on {s.host}:{s.local} for {s.service}.{s.namespace}: {e.strerror}",
                             hint="pick another local port in forwards[].local") from e
        self.bound_port = server.sockets[0].getsockname()[1]
        async with server, kube.watch(kube.discovery.list_namespaced_endpoint_slice, s.namespace,
                                      label_selector=f"kubernetes.io/service-name={s.service}",
                                      what=What("watch", "endpointslices", s.namespace)) as events:
            feed = asyncio.ensure_future(self._feed(events))
            self.log.info("127.0.0.1:%s -> %s.%s:%s", self.bound_port, s.service, s.namespace, s.port)
            ready()
            stop = asyncio.ensure_future(stopping.wait())
            try:
                done, _ = await asyncio.wait({feed, stop}, return_when=asyncio.FIRST_COMPLETED)
                if feed in done:  # the watch ended on its own: fail, the loop restarts us
                    feed.result()
                    raise TransientError(f"watch of {s.service}'s endpoints ended")
            finally:
                for t in (feed, stop, *self._conns):
                    t.cancel()
                await asyncio.gather(feed, stop, *self._conns, return_exceptions=True)
                tunnels, self._tunnels = list(self._tunnels.values()), {}
                for tunnel in tunnels:
                    tunnel.close()
                await asyncio.gather(*(t.wait_closed() for t in tunnels), return_exceptions=True)

    async def _feed(self, events: Any) -> None:
        async for kind, obj in events:
            before = self.backends.current
            self.backends.apply(kind, obj)
            live = {pod for pod, _ in self.backends.pods}
            for name in [n for n in self._tunnels if n not in live]:  # not closed: open connections end on their own
                del self._tunnels[name]
            if before is not None and before not in self.backends.pods:
                after = self.backends.pick()
                self.log.info("pod %s left %s; new connections go to %s", before[0], self.spec.service,
                              after[0] if after else "the next pod to become ready")

    async def _target(self, exclude: set[tuple[str, int]]) -> tuple[str, int]:
        """A backend to try, waiting (bounded) for one to become ready when there is none."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.connect_timeout
        while (target := self.backends.pick(exclude)) is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TransientError(f"no ready pod behind {self.spec.service}.{self.spec.namespace}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.backends.changed.wait(), remaining)
        return target

    def _tunnel(self, pod: str) -> PodTunnel:
        tunnel = self._tunnels.get(pod)
        if tunnel is None:
            tunnel = self._tunnels[pod] = PodTunnel(self.spec.kube, self.spec.namespace, pod)
        return tunnel

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        failed: set[tuple[str, int]] = set()
        try:
            for _ in range(_ATTEMPTS):
                pod, port = await self._target(failed)
                try:
                    up_r, up_w = await self._tunnel(pod).open_stream(port)
                except TpenvError as e:
                    # A pod that is going away can still be listed for a moment: try the next one.
                    self.log.info("pod %s refused a stream (%s); trying another", pod, e)
                    failed.add((pod, port))
                    continue
                await _splice(reader, writer, up_r, up_w)
                return
            self.log.warning("gave up on a connection after %d pods refused it", _ATTEMPTS)
        except TpenvError as e:
            self.log.warning("connection dropped: %s", e)
        finally:
            writer.close()


def forward_specs(config: Any, place: Callable[[Any], tuple[Kube, str, str | None]],
                  wanted: Callable[[str], bool], *,
                  connect_timeout: float = _CONNECT_TIMEOUT) -> dict[Key, ForwardSpec]:
    """A spec per wanted ``forwards:`` entry (``--only`` matches the Service name);
    ``place(forward)`` gives its context's Kube, its namespace and its context's name."""
    specs: dict[Key, ForwardSpec] = {}
    for fw in config.forwards:
        if not wanted(fw.service):
            continue
        kube, namespace, context = place(fw)
        spec = ForwardSpec(kube, namespace, fw.service, fw.port, fw.local, connect_timeout=connect_timeout,
                           context=context)
        specs[spec.key] = spec
    return specs
