"""The manager's outbound relay (docs/protocol.md §7): SSH ``direct-tcpip`` to cluster addresses
and name lookups, for developer machines (``tpenv connect``, ``tpenv.kits.relay_client``).

An asyncssh server on the manager pod's loopback, reached through the API server's
``pods/portforward`` like the sidecar's SSH port. Login exactly as protocol §2 (the pieces are
shared with the sidecar, :mod:`tpenv_agent.sshd`): user certificates signed by the CA of Secret
``tpenv-auth`` in the manager's namespace, principal = session id = SSH user name.

What an authenticated client may do, and nothing else:

- ``direct-tcpip`` to a destination whose address :class:`Policy` allows: inside the cluster's
  pod or service ranges, never the manager pod's own loopback, link-local or pod addresses, nor
  a node's address. A host name is resolved here (cluster DNS) and only its allowed addresses are
  dialled, so the check and the connection see the same address. Refusals are an SSH open failure
  whose reason starts with ``relay:``; no packet is sent to a refused destination.
- the ``tpenv-resolve`` subsystem: newline-delimited JSON (protocol §3's framing), ops
  ``resolve`` and ``ping``.

Shells, exec, other subsystems, ``tcpip-forward``, agent and X11 forwarding are refused.
Bounded: a cap on open channels per connection, timeouts on lookups and connects, a cap on
lookups in flight per channel, SSH keepalives. Logs are per connection (``[relay/<session>]``)
and name destinations, never key material.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

import asyncssh
from asyncssh.constants import OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_CONNECT_FAILED, OPEN_RESOURCE_SHORTAGE

from . import log as logs
from .sshd import SERVER_OPTIONS, CertOnlyServer

log = logging.getLogger("tpenv_agent.relay")

DEFAULT_LISTEN = "127.0.0.1:8022"
SUBSYSTEM = "tpenv-resolve"
MAX_CHANNELS = 64  # per SSH connection: direct-tcpip and resolve channels together
MAX_IN_FLIGHT = 16  # lookups per resolve channel; reading pauses above this (backpressure)
MAX_LINE = 4096  # one request; longer lines end the channel
LOOKUP_TIMEOUT = 5.0
CONNECT_TIMEOUT = 10.0
REFRESH_ON_MISS = 10.0  # seconds: a refused address re-reads the ranges at most this often

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# ---------------------------------------------------------------------------------------------
# which destinations are allowed


@dataclass(frozen=True)
class Policy:
    """The destinations the relay may dial.

    ``ranges``: the cluster's pod and service ranges (discovered, or given by ``--relay-cidr``).
    ``explicit``: the ranges were given by the operator and are taken literally; discovered
    ranges never admit loopback, link-local, multicast or unspecified addresses, the manager
    pod's own addresses (``own``) or a node's (``nodes``), even when a range contains them.
    """

    ranges: tuple[Network, ...]
    explicit: bool = False
    own: frozenset[Address] = frozenset()
    nodes: frozenset[Address] = frozenset()

    def refusal(self, ip: Address) -> str | None:
        """None when ``ip`` may be dialled, else the reason (for the SSH open failure)."""
        if not self.explicit:
            if ip.is_loopback or ip.is_unspecified:
                return f"relay: {ip} is the manager pod's own loopback"
            if ip.is_link_local or ip.is_multicast:
                return f"relay: {ip} is link-local or multicast, not a cluster address"
            if ip in self.own:
                return f"relay: {ip} is the manager pod itself"
            if ip in self.nodes:
                return f"relay: {ip} is a node's address, not a pod or service"
        if any(ip.version == net.version and ip in net for net in self.ranges):
            return None
        shown = ", ".join(str(n) for n in self.ranges) or "none known"
        return f"relay: {ip} is outside the cluster's pod and service ranges ({shown})"

    def describe(self) -> str:
        kind = "given" if self.explicit else "discovered"
        return f"{kind} ranges {', '.join(str(n) for n in self.ranges) or '(none)'}"


def parse_cidrs(values: Iterable[str]) -> tuple[Network, ...]:
    """``10.244.0.0/16`` ... as networks; ValueError naming the bad one."""
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError as e:
            raise ValueError(f"bad CIDR {v!r}: {e}") from None
    return tuple(out)


class StaticPolicy:
    """Ranges given on the command line (``--relay-cidr``)."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    async def current(self, *, refresh: bool = False) -> Policy:
        return self._policy


ApiGet = Callable[[str], Awaitable[dict | None]]  # GET path -> JSON, None on 403/404


def onlink_ipv4_subnets(route_table: str) -> tuple[Network, ...]:
    """The directly connected IPv4 subnets of ``/proc/net/route``: in a pod, its node's pod
    subnet. Routes via a gateway and the default route are left out."""
    nets = []
    for line in route_table.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 8:
            continue
        dest, flags, mask = int(cols[1], 16), int(cols[3], 16), int(cols[7], 16)
        if flags & 0x2 or mask == 0:  # RTF_GATEWAY, or the default route
            continue
        # The kernel prints the addresses in host byte order of a little-endian machine.
        to_ip = lambda v: ipaddress.IPv4Address(int.from_bytes(v.to_bytes(4, "little"), "big"))  # noqa: E731
        net = ipaddress.IPv4Network(f"{to_ip(dest)}/{to_ip(mask)}", strict=False)
        if not net.is_loopback and not net.is_link_local:
            nets.append(net)
    return tuple(dict.fromkeys(nets))


class ApiPolicy:
    """Ranges discovered from the API with the manager's service account (20-rbac.yaml.j2):

    - service ranges: the ``ServiceCIDR`` objects (networking.k8s.io/v1);
    - pod ranges: the nodes' ``spec.podCIDRs``; when no node carries one (a CNI with its own
      IPAM, or ``--allocate-node-cidrs=false``) the pod's directly connected subnets from the
      routing table, i.e. this node's pod subnet, with a warning: ``--relay-cidr`` says more;
    - node addresses (refused), and the pod's own (``own``).

    Re-read at most every :data:`REFRESH_ON_MISS` seconds when an address is refused, so a
    new node's pods become reachable without a restart.
    """

    def __init__(self, api_get: ApiGet, *, own: Iterable[Address] = (), route_file: str = "/proc/net/route",
                 refresh_every: float = REFRESH_ON_MISS) -> None:
        self._get = api_get
        self._own = frozenset(own)
        self._route_file = route_file
        self._every = refresh_every
        self._policy: Policy | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def current(self, *, refresh: bool = False) -> Policy:
        async with self._lock:
            stale = self._policy is None or (refresh and time.monotonic() - self._at >= self._every)
            if stale:
                try:
                    new = await self._discover()
                except (OSError, ValueError, KeyError, TypeError) as e:
                    if self._policy is None:
                        raise
                    log.warning("[relay/ranges] could not re-read the cluster ranges, keeping %s: %s",
                                self._policy.describe(), e)
                else:
                    if new != self._policy:
                        log.info("[relay/ranges] %s", new.describe())
                    self._policy = new
                self._at = time.monotonic()
            assert self._policy is not None
            return self._policy

    async def _discover(self) -> Policy:
        services = await self._get("/apis/networking.k8s.io/v1/servicecidrs")
        nodes = await self._get("/api/v1/nodes")
        svc_ranges = [c for item in (services or {}).get("items") or [] for c in (item.get("spec") or {}).get("cidrs") or []]
        if services is None:
            log.warning("[relay/ranges] ServiceCIDR objects are not readable: no service range known "
                        "(give them with --relay-cidr)")
        pod_ranges, node_ips = [], set()
        for node in (nodes or {}).get("items") or []:
            spec = node.get("spec") or {}
            pod_ranges += spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
            for a in (node.get("status") or {}).get("addresses") or []:
                if a.get("type") in ("InternalIP", "ExternalIP"):
                    try:
                        node_ips.add(ipaddress.ip_address(a["address"]))
                    except ValueError:
                        pass
        ranges = parse_cidrs(svc_ranges) + parse_cidrs(pod_ranges)
        if not pod_ranges:
            try:
                with open(self._route_file, encoding="ascii") as f:
                    local = onlink_ipv4_subnets(f.read())
            except OSError:
                local = ()
            log.warning("[relay/ranges] no node has spec.podCIDRs; pods reachable: this node's pod subnet %s only "
                        "(give the cluster's pod range with --relay-cidr)", ", ".join(map(str, local)) or "(none)")
            ranges += local
        return Policy(tuple(dict.fromkeys(ranges)), own=self._own, nodes=frozenset(node_ips))


# ---------------------------------------------------------------------------------------------
# name lookups


class LookupNotFound(Exception):
    """The name does not exist (NXDOMAIN, or no address)."""


class LookupFailed(Exception):
    """The lookup could not be answered now (timeout, server failure)."""


Resolver = Callable[[str], Awaitable[tuple[list[str], str | None]]]  # name -> (addresses, canonical name)


class SystemResolver:
    """``getaddrinfo`` with the pod's resolver (cluster DNS, search list) in a small thread pool
    of its own, so slow lookups never take the event loop's default executor; each lookup is
    bounded by ``timeout``."""

    def __init__(self, timeout: float = LOOKUP_TIMEOUT, workers: int = 8) -> None:
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="relay-dns")

    async def __call__(self, name: str) -> tuple[list[str], str | None]:
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self._pool, lambda: socket.getaddrinfo(
            name, None, type=socket.SOCK_STREAM, flags=socket.AI_CANONNAME))
        try:
            infos = await asyncio.wait_for(call, self.timeout)
        except asyncio.TimeoutError:
            raise LookupFailed(f"lookup of {name} timed out after {self.timeout:g}s") from None
        except socket.gaierror as e:
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise LookupNotFound(name) from None
            raise LookupFailed(f"lookup of {name} failed: {e.strerror}") from None
        except UnicodeError:  # a label too long for IDNA
            raise LookupNotFound(name) from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        canon = next((info[3] for info in infos if info[3]), None)
        return addresses, canon

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def cluster_domain(resolv_conf: str = "/etc/resolv.conf") -> str:
    """The cluster domain from the pod's search list (``<ns>.svc.cluster.local svc.cluster.local
    cluster.local``: the entry after ``svc.``); ``cluster.local`` when there is none."""
    try:
        with open(resolv_conf, encoding="utf-8") as f:
            for line in f:
                words = line.split()
                if words[:1] == ["search"]:
                    for w in words[1:]:
                        if w.startswith("svc.") and len(w) > 4:
                            return w[4:].rstrip(".")
    except OSError:
        pass
    return "cluster.local"


def candidates(name: str, namespace: str | None, domain: str) -> list[str]:
    """The names a ``resolve`` request tries, in order: a bare name (no dot) with a namespace is
    first ``<name>.<namespace>.svc.<domain>``, then the name itself (the pod's search list)."""
    if namespace and "." not in name:
        return [f"{name}.{namespace}.svc.{domain}.", name]
    return [name]


# ---------------------------------------------------------------------------------------------
# the SSH side


@dataclass
class Relay:
    """The relay server; ``async with`` starts it on ``listen`` (port 0: any) and closes it."""

    host_key: Any
    authorized: Any
    policy: Any  # StaticPolicy | ApiPolicy: async current(refresh=False) -> Policy
    resolver: Resolver = field(default_factory=SystemResolver)
    domain: str = "cluster.local"
    max_channels: int = MAX_CHANNELS
    connect_timeout: float = CONNECT_TIMEOUT
    conns: set["RelayConn"] = field(default_factory=set)
    _server: Any = None
    _closed: bool = False

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncssh.create_server(
            lambda: RelayConn(self), host, port,
            server_host_keys=[self.host_key],
            authorized_client_keys=self.authorized,
            allow_scp=False,
            encoding=None,
            **SERVER_OPTIONS,
        )
        return self._server.sockets[0].getsockname()[1]

    async def __aenter__(self) -> "Relay":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()

    def close(self) -> None:
        """Stop listening and drop every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for c in list(self.conns):
            if c.conn is not None:
                c.conn.close()
        if isinstance(self.resolver, SystemResolver):
            self.resolver.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
        for c in list(self.conns):
            if c.conn is not None:
                await c.conn.wait_closed()

    # -- what a channel does -------------------------------------------------------------------

    async def resolve(self, name: str, namespace: str | None) -> dict[str, Any]:
        """A ``resolve`` answer's fields. LookupNotFound when a candidate name is known not to
        exist and none resolved, even if a later fallback could not be asked (a cluster DNS that
        refuses names outside its zones makes glibc report a temporary failure for a bare name);
        LookupFailed when no candidate could be asked at all."""
        not_found = False
        failure: LookupFailed | None = None
        for candidate in candidates(name, namespace, self.domain):
            try:
                addresses, canon = await self.resolver(candidate)
            except LookupNotFound:
                not_found = True
                continue
            except LookupFailed as e:
                failure = failure or e
                continue
            if addresses:
                return {"name": candidate.rstrip("."), "addresses": addresses,
                        "cname": canon.rstrip(".") if canon and canon.rstrip(".") != candidate.rstrip(".") else None}
            not_found = True
        if failure is not None and not not_found:
            raise failure
        raise LookupNotFound(name)

    async def destinations(self, host: str) -> list[str]:
        """The allowed addresses for ``host`` (an address or a name), else ChannelOpenError."""
        try:
            addresses = [str(ipaddress.ip_address(host.strip("[]")))]
        except ValueError:
            try:
                addresses, _ = await self.resolver(host)
            except LookupNotFound:
                raise asyncssh.ChannelOpenError(OPEN_CONNECT_FAILED, f"relay: cannot resolve {host}: no such name") from None
            except LookupFailed as e:
                raise asyncssh.ChannelOpenError(OPEN_CONNECT_FAILED, f"relay: {e}") from None
        policy = await self.policy.current()
        refusals = {a: policy.refusal(ipaddress.ip_address(a)) for a in addresses}
        if all(refusals.values()):  # perhaps a new node or range: look again, rate-limited
            policy = await self.policy.current(refresh=True)
            refusals = {a: policy.refusal(ipaddress.ip_address(a)) for a in addresses}
        allowed = [a for a, why in refusals.items() if why is None]
        if not allowed:
            reason = next(iter(refusals.values()), None) or f"relay: {host} has no address"
            if host not in reason:
                reason = f"{reason} ({host})"
            raise asyncssh.ChannelOpenError(OPEN_ADMINISTRATIVELY_PROHIBITED, reason)
        return allowed


class RelayConn(CertOnlyServer):
    """One client connection: its session, its channels, its log unit."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.conn: Any = None
        self.channels = 0
        self.opened = self.refused = 0
        self.log = logs.unit("relay", "conn")

    def connection_made(self, conn: Any) -> None:
        self.conn = conn
        self.relay.conns.add(self)

    def auth_completed(self) -> None:
        self.log = logs.unit("relay", self.username)
        self.log.info("session connected")

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.conns.discard(self)
        if self.log.extra["unit"] != "[relay/conn]":
            why = f": {type(exc).__name__}: {exc}" if exc else ""
            self.log.info("session disconnected (%d connections opened, %d refused)%s",
                          self.opened, self.refused, why)

    def _take_channel(self) -> None:
        if self.channels >= self.relay.max_channels:
            self.refused += 1
            self.log.warning("channel refused: %d channels open already", self.channels)
            raise asyncssh.ChannelOpenError(OPEN_RESOURCE_SHORTAGE,
                                            f"relay: too many channels on this connection ({self.channels})")
        self.channels += 1

    def _release_when_closed(self, chan: Any) -> None:
        async def release() -> None:
            await chan.wait_closed()
            self.channels -= 1

        asyncio.ensure_future(release())

    # -- direct-tcpip --------------------------------------------------------------------------

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        self._take_channel()
        chan = self.conn.create_tcp_channel()
        self._release_when_closed(chan)
        return chan, self._open(dest_host, dest_port)

    async def _open(self, host: str, port: int) -> Any:
        try:
            if not 0 < port < 65536:
                raise asyncssh.ChannelOpenError(OPEN_CONNECT_FAILED, f"relay: bad port {port}")
            addresses = await self.relay.destinations(host)
        except asyncssh.ChannelOpenError as e:
            self.refused += 1
            self.log.info("to %s:%d refused: %s", host, port, e.reason)
            raise
        last: Exception | None = None
        for address in addresses:
            try:
                session = await asyncio.wait_for(self.conn.forward_connection(address, port), self.relay.connect_timeout)
            except asyncio.TimeoutError:
                last = asyncssh.ChannelOpenError(OPEN_CONNECT_FAILED, f"relay: connecting to {address}:{port} timed out")
            except asyncssh.ChannelOpenError as e:
                last = asyncssh.ChannelOpenError(OPEN_CONNECT_FAILED, f"relay: {address}:{port}: {e.reason}")
            else:
                self.opened += 1
                self.log.info("to %s:%d via %s opened", host, port, address)
                return session
        assert isinstance(last, asyncssh.ChannelOpenError)
        self.log.info("to %s:%d failed: %s", host, port, last.reason)
        raise last

    # -- sessions: the resolve subsystem only --------------------------------------------------

    def session_requested(self) -> Any:
        self._take_channel()
        return ResolveSession(self)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self.log.info("tcpip-forward %s:%d refused: the relay only dials out", listen_host, listen_port)
        return False


class ResolveSession(asyncssh.SSHServerSession):
    """The ``tpenv-resolve`` subsystem: JSON lines in, JSON lines out (protocol §7)."""

    def __init__(self, owner: RelayConn) -> None:
        self.owner = owner
        self.chan: Any = None
        self.buf = b""
        self.tasks: set[asyncio.Task] = set()
        self.subsystem = False
        self.paused = False
        self.eof = False

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.channels -= 1
        for t in list(self.tasks):
            t.cancel()

    def pty_requested(self, *args: Any) -> bool:
        return False

    def shell_requested(self) -> bool:
        self.owner.log.info("shell refused")
        return False

    def exec_requested(self, command: str) -> bool:
        self.owner.log.info("exec refused")
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem != SUBSYSTEM:
            self.owner.log.info("subsystem %r refused", subsystem[:64])
            return False
        self.subsystem = True
        return True

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                self._start(line)
        if len(self.buf) > MAX_LINE:
            self._send({"id": None, "ok": False, "error": {"code": "bad-request",
                                                          "message": f"request longer than {MAX_LINE} bytes"}})
            self.chan.close()

    def eof_received(self) -> bool:
        # Half-open until the answers in flight are written; then the channel closes.
        self.eof = True
        if not self.tasks:
            self.chan.close()
        return True

    def _start(self, line: bytes) -> None:
        task = asyncio.ensure_future(self._answer(line))
        self.tasks.add(task)
        task.add_done_callback(self._done)
        if len(self.tasks) >= MAX_IN_FLIGHT and not self.paused:
            self.paused = True
            self.chan.pause_reading()

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if self.eof and not self.tasks:
            self.chan.close()
            return
        if self.paused and len(self.tasks) < MAX_IN_FLIGHT:
            self.paused = False
            self.chan.resume_reading()

    def _send(self, answer: dict[str, Any]) -> None:
        if not self.chan.is_closing():
            self.chan.write(json.dumps(answer).encode() + b"\n")

    async def _answer(self, line: bytes) -> None:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError:
            self._send({"id": None, "ok": False, "error": {"code": "bad-request", "message": "a JSON object per line"}})
            return
        rid, op = req.get("id"), req.get("op")
        try:
            if op == "ping":
                answer: dict[str, Any] = {"time": time.time()}
            elif op == "resolve":
                name, namespace = req.get("name"), req.get("namespace")
                if not isinstance(name, str) or not name or len(name) > 253 or not (
                        namespace is None or isinstance(namespace, str)):
                    raise _BadRequest("resolve needs a name (string, at most 253 characters) and an optional namespace")
                answer = await self.owner.relay.resolve(name, namespace or None)
                self.owner.log.info("resolved %s: %s", name, ", ".join(answer["addresses"]))
            else:
                raise _BadRequest(f"unknown op {op!r}: resolve and ping are served")
        except _BadRequest as e:
            self._send({"id": rid, "ok": False, "error": {"code": "bad-request", "message": str(e)}})
        except LookupNotFound:
            self.owner.log.info("resolved %s: not found", req.get("name"))
            self._send({"id": rid, "ok": False, "error": {"code": "not-found", "message": f"no such name: {req.get('name')}"}})
        except LookupFailed as e:
            self._send({"id": rid, "ok": False, "error": {"code": "internal", "message": str(e)}})
        else:
            self._send({"id": rid, "ok": True, **answer})


class _BadRequest(Exception):
    pass


__all__ = ["Relay", "Policy", "StaticPolicy", "ApiPolicy", "SystemResolver", "LookupNotFound", "LookupFailed",
           "parse_cidrs", "cluster_domain", "candidates", "onlink_ipv4_subnets", "DEFAULT_LISTEN", "SUBSYSTEM"]
