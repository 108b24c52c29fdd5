"""The outbound core: one relay session to the manager (kept alive: a dropped port-forward or a
restarted manager pod is reconnected with backoff, while the local listeners stay where they
are), the proxied ranges, the name rules and tpenv's resolver, and ``on_connection`` for the
captures (contract: ``tpenv/engine/outbound/__init__.py``).

    async with OutboundCore(kube, options) as core:
        core.resolver_address, core.cidrs, core.dns_suffixes
        await core.on_connection(ip, port, reader, writer)
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from tpenv.engine.outbound.direct import DirectPaths
from tpenv.engine.outbound.policy import Network, Ranges, check_conflicts, local_routes, parse_cidr
from tpenv.errors import Forbidden, NotFound, TpenvError, TransientError, TunnelDropped, UsageError
from tpenv.kits.aio import Backoff, unit_logger
from tpenv.kits.dns_names import DEFAULT_EXCLUDED_SUFFIXES, NameRules, merge_search
from tpenv.kits.dns_resolver import Resolver
from tpenv.kits.dns_server import DnsServer
from tpenv.kits.dns_upstream import StreamDns, Upstream
from tpenv.kits.kube import Kube, What
from tpenv.kits.relay_client import RelaySession
from tpenv.kits.splice import splice

RELAY_RIGHT = ("Role tpenv-relay-client in namespace tpenv (pods get/list, pods/portforward create, "
               "secrets/tpenv-auth get): ask a cluster admin for "
               "`kubectl -n tpenv create rolebinding NAME --role=tpenv-relay-client --user=YOU`")
RECONNECT_WAIT = 30.0  # how long a new connection waits for a relay that is reconnecting


@dataclass
class ConnectOptions:
    """What the ``connect:`` section and the flags say (already validated)."""

    namespace: str
    mapped_namespaces: list[str] = field(default_factory=list)  # empty: the connected namespace only
    search_first: list[str] = field(default_factory=list)  # intercepted workloads' namespaces
    also_proxy: list[Network] = field(default_factory=list)
    never_proxy: list[Network] = field(default_factory=list)
    allow_conflicting_subnets: bool = False
    excluded_suffixes: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDED_SUFFIXES))
    check_routes: bool = False  # host mode: routes would really collide
    mark: int | None = None  # SO_MARK of directly dialled sockets (a capture's rules skip it)
    direct: bool = True  # Service/pod connections on their own port-forward streams where allowed (direct.py)

    @property
    def search(self) -> list[str]:
        return merge_search(self.search_first, [self.namespace], self.mapped_namespaces)


class OutboundCore:
    """``async with``; ``close()`` safe twice, then ``wait_closed()``."""

    def __init__(self, kube: Kube, options: ConnectOptions, *, relay_factory: Any = None,
                 upstream: Upstream | None = None) -> None:
        """``upstream``: where names outside the cluster go (default: resolv.conf's nameservers)."""
        self.kube, self.options = kube, options
        self.upstream = upstream or Upstream(mark=options.mark)
        self.log = unit_logger("connect", options.namespace)
        self._relay_factory = relay_factory or (lambda: RelaySession(kube, session_id=None))
        self.relay: RelaySession | None = None
        self._relay_up = asyncio.Event()
        self.ranges = Ranges(())
        self.rules = NameRules(options.search, excluded_suffixes=tuple(options.excluded_suffixes))
        self.cluster_dns: list[str] = []
        self.server: DnsServer | None = None
        self.resolver: Resolver | None = None
        self._stream_dns: StreamDns | None = None
        self.direct: DirectPaths | None = None
        self._keeper: asyncio.Task | None = None
        self._conns: set[asyncio.Task] = set()
        self.warnings: list[str] = []
        self.reconnects = 0
        self.last_error: str | None = None
        self.mark = options.mark
        self._closed = False

    # --- the contract --------------------------------------------------------------------------
    @property
    def cidrs(self) -> list[Network]:
        return self.ranges.proxied

    @property
    def dns_suffixes(self) -> list[str]:
        return self.rules.suffixes

    @property
    def search_list(self) -> list[str]:
        return self.rules.search_list

    @property
    def resolver_address(self) -> tuple[str, int]:
        assert self.server is not None and self.server.address is not None, "start() first"
        return self.server.address

    async def on_connection(self, dst: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int,
                            reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One captured connection to ``dst:port``: dialled, spliced, both ends closed."""
        try:
            up_r, up_w = await self.dial(str(dst), port)
        except TpenvError as e:
            self.log.info("%s:%s: %s", dst, port, e)
            writer.close()
            return
        await splice(reader, writer, up_r, up_w)

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> "OutboundCore":
        try:
            await self._open_relay()
            await self._learn()
            self.resolver = Resolver(self.rules, cluster=self._cluster_dns, upstream=self.upstream.query,
                                     refresh_namespaces=self._refresh_namespaces)
            self.server = await DnsServer(self.resolver.answer, fast=self.resolver.answer_now).start()
            if self.options.direct:
                self.direct = await DirectPaths(self.kube, self.options.search, self._portforward_allowed, self.log).start()
            self._keeper = asyncio.ensure_future(self._keep())
        except BaseException:
            self.close()
            await self.wait_closed()
            raise
        self.log.info("proxying %s; cluster DNS %s; resolver on %s:%s", ", ".join(map(str, self.cidrs)) or "nothing",
                      ", ".join(self.cluster_dns) or "(through the relay's lookups)", *self.resolver_address)
        return self

    async def __aenter__(self) -> "OutboundCore":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    def close(self) -> None:
        self._closed = True
        for thing in (self._keeper, *self._conns):
            if thing is not None:
                thing.cancel()
        for thing in (self.server, self._stream_dns, self.direct, self.relay):
            if thing is not None:
                thing.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*(t for t in (self._keeper, *self._conns) if t is not None), return_exceptions=True)
        for thing in (self.server, self._stream_dns, self.direct, self.relay):
            if thing is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(thing.wait_closed(), 5)

    # --- relay session, kept alive -------------------------------------------------------------
    async def _open_relay(self) -> None:
        relay = self._relay_factory()
        try:
            await relay.connect()
        except Forbidden as e:
            raise Forbidden(f"cannot reach the outbound relay: {e}", hint=f"tpenv connect needs {RELAY_RIGHT}") from e
        self.relay = relay
        self._relay_up.set()

    async def _keep(self) -> None:
        """Reconnect whenever the session ends (port-forward cut, manager pod gone, API outage)."""
        backoff = Backoff(0.2, 5.0, healthy_after=10.0)
        while not self._closed:
            assert self.relay is not None
            backoff.started()
            await self.relay.closed.wait()
            self._relay_up.clear()
            self.log.warning("relay session ended; reconnecting")
            while not self._closed:
                with contextlib.suppress(Exception):
                    await self.relay.wait_closed()
                try:
                    await self._open_relay()
                    self.reconnects += 1
                    self.last_error = None
                    self.log.info("relay session back (pod %s)", self.relay.pod)
                    break
                except TpenvError as e:
                    self.last_error = str(e)
                    delay = backoff.failed()
                    self.log.info("relay not reachable yet (%s); next try in %.1fs", e, delay)
                    await asyncio.sleep(delay)

    @property
    def relay_up(self) -> bool:
        return self._relay_up.is_set()

    async def live_relay(self) -> RelaySession:
        """The session, waiting (bounded) for one being reconnected."""
        if self.relay is not None and self.relay.closed.is_set():
            self._relay_up.clear()  # ended a moment ago: the keeper has not seen it yet
        if not self._relay_up.is_set():
            try:
                await asyncio.wait_for(self._relay_up.wait(), RECONNECT_WAIT)
            except asyncio.TimeoutError as e:
                raise TunnelDropped(f"the relay is not back after {RECONNECT_WAIT:g}s: {self.last_error}") from e
        assert self.relay is not None
        return self.relay

    async def round_trip(self) -> float:
        """Seconds for one request/answer through the relay."""
        relay = await self.live_relay()
        t0 = time.perf_counter()
        await relay.ping()
        return time.perf_counter() - t0

    # --- what the cluster is -------------------------------------------------------------------
    async def _learn(self) -> None:
        relay = await self.live_relay()
        try:
            info = await relay.info()
        except UsageError:  # a manager older than the `info` op
            info = {"ranges": [], "domain": "cluster.local", "nameservers": []}
            self.warnings.append("the manager does not report its ranges (upgrade it: tpenv manager upgrade); "
                                 "only also_proxy ranges are proxied")
        discovered = tuple(parse_cidr(c, "the relay's ranges") for c in info.get("ranges") or [])
        self.ranges = Ranges(discovered, tuple(self.options.also_proxy), tuple(self.options.never_proxy))
        self.rules.cluster_domain = info.get("domain") or "cluster.local"
        # The kube-dns Service (kubeadm, kind, the clouds), then the pods' nameservers: the first
        # the relay may dial is used (a DNS on a node's address is not a pod or service address).
        self.cluster_dns = list(dict.fromkeys([*await self._kube_dns(),
                                               *(a for a in info.get("nameservers") or [] if _is_ip(a))]))
        if not self.cluster_dns:
            self.warnings.append("no cluster DNS found (Service kube-dns, the pods' nameserver): names are "
                                 "looked up by the relay, A and AAAA records only")
        for ns in self.options.mapped_namespaces:
            await self.kube.require_namespace(ns)
        await self._refresh_namespaces()
        if self.options.check_routes:
            self.warnings += check_conflicts(self.cidrs, local_routes(), allow=self.options.allow_conflicting_subnets)
        for w in self.warnings:
            self.log.warning("%s", w)

    async def _kube_dns(self) -> list[str]:
        """The cluster DNS as kubeadm, kind and the clouds publish it: Service kube-dns in kube-system."""
        try:
            svc = await self.kube.call(self.kube.core.read_namespaced_service, "kube-dns", "kube-system",
                                       what=What("get", "services", "kube-system", "kube-dns"))
        except TpenvError as e:
            self.log.info("Service kube-dns in kube-system not readable (%s): the pods' nameserver is used", e)
            return []
        ips = (svc.get("spec") or {}).get("clusterIPs") or [(svc.get("spec") or {}).get("clusterIP")]
        return [ip for ip in ips if ip and ip != "None"]

    async def _refresh_namespaces(self) -> None:
        try:
            items = (await self.kube.call(self.kube.core.list_namespace, what=What("list", "namespaces")))["items"]
            self.rules.namespaces = {i["metadata"]["name"] for i in items}
        except Forbidden:  # a user who may not list namespaces: the configured ones still work
            self.rules.namespaces = set(self.options.search)

    async def _cluster_dns(self, message: Any) -> Any:
        if not self.cluster_dns:  # none known, or none the relay accepts: its lookups, A/AAAA only
            return await self._lookup_by_relay(message)
        if self._stream_dns is None:
            self._stream_dns = StreamDns(self._open_cluster_dns)
        return await self._stream_dns.query(message)

    async def _open_cluster_dns(self) -> tuple[Any, Any]:
        """A stream to the first cluster DNS address the relay accepts (remembered)."""
        refused = []
        for server in list(self.cluster_dns):
            try:
                return await self._open_through_relay(server, 53)
            except Forbidden as e:
                refused.append(str(e))
                self.cluster_dns.remove(server)
                self.log.info("cluster DNS %s not usable through the relay: %s", server, e)
        raise Forbidden("no cluster DNS address the relay may dial: " + "; ".join(refused))

    async def _lookup_by_relay(self, message: Any) -> Any:
        """An answer built from the relay's ``resolve`` op: the fallback without a cluster DNS."""
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        q = message.question[0]
        reply = dns.message.make_response(message)
        try:
            found = await (await self.live_relay()).resolve(q.name.to_text().rstrip("."))
        except NotFound:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            return reply
        family = 4 if q.rdtype == dns.rdatatype.A else 6 if q.rdtype == dns.rdatatype.AAAA else 0
        addrs = [a for a in found["addresses"] if ipaddress.ip_address(a).version == family]
        if addrs:
            reply.answer.append(dns.rrset.from_text_list(q.name, 5, "IN", q.rdtype, addrs))
        return reply

    # --- dialling ------------------------------------------------------------------------------
    async def _open_through_relay(self, host: str, port: int) -> tuple[Any, Any]:
        relay = await self.live_relay()
        return await relay.open_connection(host, port)

    async def lookup(self, name: str) -> str | None:
        """The address of a cluster name (A, else AAAA) as tpenv's resolver answers it; None when
        ``name`` is not the cluster's."""
        import dns.message
        import dns.rdatatype

        if self.resolver is None or self.rules.candidates(name) is None:
            return None
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            wire = await self.resolver.answer(dns.message.make_query(name.rstrip(".") + ".", rdtype).to_wire())
            answer = dns.message.from_wire(wire) if wire else None
            for rrset in answer.answer if answer else []:
                if rrset.rdtype == rdtype:
                    return rrset[0].address
        raise NotFound(f"{name}: no such name in the cluster (namespaces searched: {', '.join(self.rules.search)})")

    async def dial(self, host: str, port: int) -> tuple[Any, Any]:
        """A connection to ``host:port``: cluster addresses and names through the relay, anything
        else from this machine (``mark`` set on the socket)."""
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            address = await self.lookup(host)
            if address is None:
                return await self._dial_direct(host, port)
            ip = ipaddress.ip_address(address)
        if self.ranges.contains(ip):
            if self.direct is not None and (stream := await self.direct.dial(ip, port)) is not None:
                return stream
            return await self._open_through_relay(str(ip), port)
        return await self._dial_direct(str(ip), port)

    def _portforward_allowed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """What a direct port-forward may reach: what the relay itself would dial (its ranges,
        not also_proxy) and the user still proxies (not never_proxy)."""
        return self.ranges.contains(ip) and any(ip.version == n.version and ip in n for n in self.ranges.discovered)

    async def _dial_direct(self, host: str, port: int) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            if self.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, addr), 10)
            except BaseException:
                sock.close()
                raise
            return await asyncio.open_connection(sock=sock)
        except (OSError, asyncio.TimeoutError) as e:
            raise TransientError(f"cannot connect to {host}:{port}: {e!r}") from e


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


__all__ = ["OutboundCore", "ConnectOptions", "RELAY_RIGHT"]
