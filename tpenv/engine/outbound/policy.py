"""Which addresses go to the cluster: the relay's ranges, plus ``also_proxy``, minus
``never_proxy`` (pure logic), and the local routes they would collide with.

A collision (a cluster range overlapping a route this machine already has, e.g. a VPN or a
docker bridge) is reported with the addresses affected and the knobs; it never goes silently
wrong. Unreachable/blackhole routes are not collisions (nothing uses them), nor is the
default route.
"""
from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from tpenv.errors import PermanentError, UsageError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
KNOBS = "never_proxy (--never-proxy) to leave it local, also_proxy (--also-proxy) to add ranges, " \
        "allow_conflicting_subnets (--allow-conflicting-subnets) to send it to the cluster anyway"


def parse_cidr(value: str, where: str) -> Network:
    """``value`` as a network (a bare address is a /32 or /128); UsageError naming ``where``."""
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as e:
        raise UsageError(f"{where}: {value!r} is not a CIDR (e.g. 10.96.0.0/12 or 192.168.5.7)") from e


def subtract(nets: Iterable[Network], holes: Iterable[Network]) -> list[Network]:
    """``nets`` minus ``holes``, as few networks as possible, sorted."""
    out = list(nets)
    for hole in holes:
        nxt: list[Network] = []
        for n in out:
            if n.version != hole.version or not n.overlaps(hole):
                nxt.append(n)
            elif hole.supernet_of(n):  # type: ignore[arg-type]
                continue
            else:
                nxt.extend(n.address_exclude(hole))  # type: ignore[arg-type]
        out = nxt
    return sorted(ipaddress.collapse_addresses([n for n in out if n.version == 4]), key=str) + \
        sorted(ipaddress.collapse_addresses([n for n in out if n.version == 6]), key=str)  # type: ignore[return-value]


@dataclass(frozen=True)
class Ranges:
    """The proxied ranges: ``discovered`` (the relay's) + ``also`` - ``never``."""

    discovered: tuple[Network, ...]
    also: tuple[Network, ...] = ()
    never: tuple[Network, ...] = ()

    @property
    def proxied(self) -> list[Network]:
        return subtract([*self.discovered, *self.also], self.never)

    def contains(self, ip: Address) -> bool:
        return any(ip.version == n.version and ip in n for n in self.proxied)


@dataclass(frozen=True)
class Route:
    dst: Network
    dev: str


def local_routes() -> list[Route]:
    """This machine's routes (main table, both families) that carry traffic: ``ip -j route``."""
    ip = shutil.which("ip")
    if ip is None:
        return []
    routes: list[Route] = []
    for family in ("-4", "-6"):
        try:
            out = subprocess.run([ip, "-j", family, "route", "show", "table", "main"], capture_output=True,
                                 text=True, timeout=5, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for r in json.loads(out or "[]"):
            if r.get("type") in ("unreachable", "blackhole", "prohibit", "throw") or r.get("dst") in (None, "default"):
                continue
            try:
                routes.append(Route(ipaddress.ip_network(r["dst"], strict=False), r.get("dev") or "?"))
            except ValueError:
                continue
    return routes


def conflicts(proxied: Iterable[Network], routes: Iterable[Route]) -> list[tuple[Network, Route]]:
    """Each (proxied range, local route) pair that overlap."""
    return [(n, r) for n in proxied for r in routes
            if n.version == r.dst.version and n.overlaps(r.dst) and not r.dst.is_link_local]


def check_conflicts(proxied: list[Network], routes: list[Route], *, allow: bool) -> list[str]:
    """Warnings when ``allow`` (the cluster wins for those addresses), else PermanentError listing
    every overlap and the knobs."""
    found = conflicts(proxied, routes)
    lines = [f"{n} (cluster) overlaps the local route {r.dst} via {r.dev}" for n, r in found]
    if found and not allow:
        raise PermanentError("cluster addresses collide with this machine's routes: " + "; ".join(lines),
                             hint=f"choose: {KNOBS}")
    return [f"{line}: sent to the cluster (allow_conflicting_subnets)" for line in lines]


__all__ = ["Ranges", "Route", "parse_cidr", "subtract", "local_routes", "conflicts", "check_conflicts", "KNOBS"]
