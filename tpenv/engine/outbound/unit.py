"""The ``connect`` unit of ``tpenv up`` (and of ``tpenv connect``): the outbound core with its
capture in front, key ``("connect", namespace)`` (``("connect", namespace, context)`` in a file
with ``contexts:``).

It heals by itself: the core reconnects its relay session with backoff (a cut port-forward, a
deleted manager pod, an API server outage) while the resolver, the proxy and the port maps keep
their addresses, so processes already pointed at them recover with no restart. Handlers that
depend on it get its env (env mode: proxy variables and port-map rewrites) at each start.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tpenv.engine.outbound.core import ConnectOptions, OutboundCore
from tpenv.engine.outbound.envmode import EnvCapture
from tpenv.engine.outbound.modes import Choice, choose
from tpenv.engine.outbound.policy import parse_cidr
from tpenv.engine.units import Key, Notify, State, TaskUnit, hash_spec
from tpenv.kits.capture import MARK as CAPTURE_MARK  # SO_MARK of tpenv's own sockets: the capture rules skip it
from tpenv.kits.kube import Kube


def connect_options(connect: Any, namespace: str, *, search_first: list[str] = (), flags: Mapping[str, Any] = {},
                    mode: str = "env") -> ConnectOptions:
    """ConnectOptions from the ``connect:`` section, with the command line's flags on top."""
    mapped = flags.get("mapped_namespaces") or connect.mapped
    also = [parse_cidr(c, "--also-proxy") for c in flags.get("also_proxy") or []] or \
        [parse_cidr(c, "connect.also_proxy") for c in connect.also_proxy]
    never = [parse_cidr(c, "--never-proxy") for c in flags.get("never_proxy") or []] or \
        [parse_cidr(c, "connect.never_proxy") for c in connect.never_proxy]
    return ConnectOptions(namespace=namespace, mapped_namespaces=list(mapped), search_first=list(search_first),
                          also_proxy=also, never_proxy=never,
                          allow_conflicting_subnets=bool(flags.get("allow_conflicting_subnets")
                                                         or connect.allow_conflicting_subnets),
                          excluded_suffixes=list(connect.excluded_suffixes), check_routes=mode == "host",
                          mark=CAPTURE_MARK if mode == "host" else None)


async def api_server_addresses(server_url: str) -> list[str]:
    """The API server's addresses. The host capture leaves them alone: tpenv's own API traffic (and
    the port-forward the relay rides on) must never be redirected into the relay, even where the
    server's address lies in a proxied range (an in-cluster kubeconfig, an overlapping ClusterIP)."""
    host = urllib.parse.urlsplit(server_url).hostname or ""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []  # the kube client cannot reach it either; its own error says so
    return sorted({i[4][0] for i in infos})


async def start_capture(choice: Choice, core: OutboundCore, stack: contextlib.AsyncExitStack, *,
                        handlers: bool = False) -> Any:
    """The capture of ``choice`` in front of ``core``, entered on ``stack``. ``handlers``: for
    the processes of ``tpenv up`` (ns mode: each wrapped in its own namespaces)."""
    if choice.mode == "env":
        return await stack.enter_async_context(EnvCapture(core))
    if choice.mode == "host":
        from tpenv.kits.capture_host import HostCapture
        from tpenv.kits.dns_upstream import nameservers

        exclude = await api_server_addresses(core.kube.host)
        return await stack.enter_async_context(HostCapture(core.cidrs, core.on_connection, dns=core.resolver_address,
                                                           nameservers=nameservers(), exclude=exclude,
                                                           mark=CAPTURE_MARK))
    if handlers:
        from tpenv.engine.outbound.nsmode import NsHandlers

        return await stack.enter_async_context(NsHandlers(core))
    return None  # ns: per command (tpenv connect -- CMD), started by the verb


@dataclass(frozen=True)
class ConnectSpec:
    kube: Kube = field(compare=False, repr=False)
    connect: Any = field(compare=False)  # the connect: section (tpenv.config.models.Connect)
    namespace: str
    search_first: tuple[str, ...] = ()
    flags: tuple[tuple[str, Any], ...] = ()
    context: str | None = None
    on_ready: Callable[["ConnectUnit"], None] | None = field(default=None, compare=False, repr=False)
    on_failed: Callable[[BaseException], None] | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> Key:
        # In a file with contexts:, the key ends with the context's name, like every unit's there.
        return ("connect", self.namespace, *((self.context,) if self.context else ()))

    @property
    def spec_hash(self) -> str:
        # An entry of contexts: that now finds another kube context restarts the connection.
        return hash_spec(self.connect.model_dump(mode="json"), self.namespace, list(self.search_first),
                         [list(f) for f in self.flags], self.kube.context if self.context else None)

    @property
    def depends_on(self) -> frozenset[Key]:
        return frozenset()

    def create(self, notify: Notify) -> "ConnectUnit":
        return ConnectUnit(self, notify)


class ConnectUnit(TaskUnit):
    """Ready once the relay answers, the resolver listens and the capture is in place."""

    def __init__(self, spec: ConnectSpec, notify: Notify) -> None:
        super().__init__(spec.key, spec.spec_hash, notify, stop_grace=5.0)
        self.spec = spec
        self.choice: Choice | None = None
        self.core: OutboundCore | None = None
        self.capture: Any = None
        self.snapshot: dict[str, Any] = {"namespace": spec.namespace, "context": spec.context, "state": "starting"}

    async def run(self, stopping: asyncio.Event, ready: Callable[[], None]) -> None:
        s = self.spec
        async with contextlib.AsyncExitStack() as stack:
            try:
                flags = dict(s.flags)
                self.choice = choose(flags.get("mode") or s.connect.mode, command=False)
                self.log.info("mode %s: %s", self.choice.mode, self.choice.why)
                options = connect_options(s.connect, s.namespace, search_first=list(s.search_first), flags=flags,
                                          mode=self.choice.mode)
                self.core = await stack.enter_async_context(OutboundCore(s.kube, options))
                self.capture = await start_capture(self.choice, self.core, stack, handlers=True)
            except BaseException as e:
                if s.on_failed:
                    s.on_failed(e)
                raise
            ready()
            if s.on_ready:
                s.on_ready(self)
            # The status section is refreshed here (relay round trip included), so `tpenv status`
            # answers at once, even while the relay reconnects.
            while not stopping.is_set():
                self.snapshot = await self.describe()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), 5.0)

    async def env_for(self, env: Mapping[str, str], namespace: str) -> dict[str, str]:
        """A handler's env under this connection (env mode: proxy variables and port maps)."""
        if isinstance(self.capture, EnvCapture):
            return await self.capture.env_for(env, namespace)
        return dict(env)

    def wrap(self, argv: list[str], inbound: list[int] = ()) -> list[str]:
        """A handler's argv under this connection (ns mode: in its own namespaces)."""
        from tpenv.engine.outbound.nsmode import NsHandlers

        return self.capture.wrap(argv, inbound) if isinstance(self.capture, NsHandlers) else list(argv)

    async def describe(self) -> dict[str, Any]:
        """The connection section of ``tpenv status``."""
        core = self.core
        info: dict[str, Any] = {"namespace": self.spec.namespace, "context": self.spec.context,
                                "mode": self.choice.mode if self.choice else None,
                                "why": self.choice.why if self.choice else None}
        if core is None:
            return info
        info.update(mapped_namespaces=core.rules.search, cidrs=[str(c) for c in core.cidrs],
                    dns_suffixes=core.dns_suffixes, cluster_dns=core.cluster_dns,
                    resolver="%s:%s" % core.resolver_address if core.server else None,
                    relay_pod=core.relay.pod if core.relay else None, reconnects=core.reconnects,
                    warnings=core.warnings)
        if isinstance(self.capture, EnvCapture):
            info["proxy"] = f"127.0.0.1:{self.capture.proxy.port}"
            info["port_maps"] = dict(self.capture.maps.by_service)
        try:
            info["relay_round_trip_ms"] = round(await asyncio.wait_for(core.round_trip(), 3) * 1000, 2)
        except Exception as e:  # a status must answer while the relay is down: say so instead
            info["relay_round_trip_ms"] = None
            info["relay_error"] = str(e) or type(e).__name__
        return info

    def health(self):
        st = super().health()
        if st.state is State.READY and self.core is not None and not self.core.relay_up:
            st.detail = f"relay reconnecting: {self.core.last_error or 'session ended'}"
        elif st.state is State.READY and self.choice is not None:
            st.detail = f"mode {self.choice.mode}"
        return st


__all__ = ["ConnectSpec", "ConnectUnit", "api_server_addresses", "connect_options", "start_capture", "CAPTURE_MARK"]
