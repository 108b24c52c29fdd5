"""Which destinations the manager's outbound relay (:mod:`tpenv_agent.relay`, docs/protocol.md
§7) may dial: the cluster's pod and service address ranges, and the refusal of everything else.

Kept apart from the SSH server so the decision is plain data and code that a unit test can drive
without a connection: :class:`Policy` (the ranges and the allow/refuse decision, pure),
:func:`parse_cidrs` (``--relay-cidr``), :func:`onlink_ipv4_subnets` (the route-table fallback,
pure), and the two sources the relay asks for the current policy: :class:`StaticPolicy` (ranges
given by the operator) and :class:`ApiPolicy` (ranges discovered from the API: nodes'
``podCIDRs``, ``ServiceCIDR`` objects, re-read when an address is refused).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

log = logging.getLogger("tpenv_agent.relay.policy")

REFRESH_ON_MISS = 10.0  # seconds: a refused address re-reads the ranges at most this often

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


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


__all__ = ["Policy", "StaticPolicy", "ApiPolicy", "ApiGet", "parse_cidrs", "onlink_ipv4_subnets",
           "REFRESH_ON_MISS", "Network", "Address"]
