"""The ``host`` capture of ``tpenv connect`` (root): the cluster's CIDRs, on this machine, go to a
local transparent proxy, and DNS queries to the machine's nameservers go to tpenv's resolver.

    async with HostCapture(["10.96.0.0/16"], on_connection, dns=("127.0.0.1", 5353),
                           nameservers=["10.0.0.53"], exclude=["10.96.0.1"]) as cap:
        ...   # every TCP connection to 10.96.0.0/16 reaches on_connection(dst_ip, dst_port, r, w)

How: one nftables table ``ip tpenv`` created with ``flags owner`` through libnftables in this
very process (:mod:`tpenv.kits.nft`). Its ``output`` nat chain redirects (REDIRECT, so the
original destination stays in conntrack and :func:`~tpenv.kits.capture.original_dst` reads it)
TCP to the proxied CIDRs onto a listener on 127.0.0.1, and UDP/TCP port 53 to the configured
nameservers onto the resolver. Packets carrying :data:`~tpenv.kits.capture.MARK` (tpenv's own
upstream sockets) and ``exclude`` (the API server's address, when it lies in a proxied range)
pass untouched.

Nothing else changes on the machine: no link, no route, no file. ``/etc/resolv.conf`` and
``/etc/hosts`` are only read. When the process ends in any way, kill -9 included, the kernel
deletes the owned table with its netlink socket, so nothing is left to clean up; :func:`sweep`
(``tpenv quit``, the next connect) reports whether anything was.

Where libnftables is absent, the same rules go into iptables (:mod:`tpenv.kits.capture_iptables`),
with a guard process that removes them when this process ends, kill -9 included.

Where systemd-resolved runs, the configured nameserver is its stub (127.0.0.53), which the same
port-53 redirect covers; tpenv's resolver then asks the stub for the names it does not own.
"""
from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable
from typing import Any

from tpenv.errors import Conflict, PermanentError, UsageError
from tpenv.kits import capture_iptables
from tpenv.kits import nft as nftkit
from tpenv.kits.aio import unit_logger
from tpenv.kits.capture import MARK, CaptureListener, OnConnection, networks

TABLE = "tpenv"
FAMILY = "ip"
CHAIN = "output"


def _addr_set(nets: Iterable[Any]) -> dict[str, Any]:
    return {"set": [{"prefix": {"addr": str(n.network_address), "len": n.prefixlen}} for n in nets]}


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _daddr() -> dict[str, Any]:
    return {"payload": {"protocol": "ip", "field": "daddr"}}


def rules(proxied: list[Any], proxy_port: int, *, dns_port: int | None = None, nameservers: Iterable[Any] = (),
          exclude: Iterable[Any] = (), mark: int = MARK) -> list[dict[str, Any]]:
    """The JSON commands of the table's content (pure: unit-tested, and shown by ``doctor``).
    IPv4 only: IPv6 ranges are refused by :class:`HostCapture` with a message."""
    chain = {"family": FAMILY, "table": TABLE, "name": CHAIN}
    out: list[dict[str, Any]] = [{"add": {"chain": {**chain, "type": "nat", "hook": "output", "prio": -100,
                                                    "policy": "accept"}}}]

    def rule(*expr: dict[str, Any]) -> None:
        out.append({"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": CHAIN, "expr": list(expr)}}})

    rule(_match({"meta": {"key": "mark"}}, mark), {"return": None})
    if dns_port is not None:
        servers = [n for n in networks(f"{s}/32" if "/" not in str(s) else s for s in nameservers) if n.version == 4]
        for proto in ("udp", "tcp"):
            if servers:
                rule(_match(_daddr(), _addr_set(servers)),
                     _match({"payload": {"protocol": proto, "field": "dport"}}, 53),
                     {"redirect": {"port": dns_port}})
    # After the DNS rules: the API server may share its address with a nameserver (a VM or a
    # router serving both); its port 53 is still the resolver's, every other port passes.
    excluded = [n for n in networks(exclude) if n.version == 4]
    if excluded:
        rule(_match(_daddr(), _addr_set(excluded)), {"return": None})
    if proxied:
        rule(_match(_daddr(), _addr_set(proxied)), _match({"meta": {"key": "l4proto"}}, "tcp"),
             {"redirect": {"port": proxy_port}})
    return out


def sweep(nft: nftkit.Nft | None = None) -> list[str]:
    """Remove what a previous connect left in this network namespace; what was removed, as
    sentences. An owned table belongs to a live process (the kernel deletes it with its owner), so
    it means another ``tpenv connect`` is running: Conflict."""
    if nft is None and not nftkit.available():
        return capture_iptables.sweep()
    own = nft is None
    nft = nft or nftkit.Nft()
    try:
        removed = capture_iptables.sweep()
        for t in nft.tables():
            if t["name"] != TABLE or t["family"] != FAMILY:
                continue
            if "owner" in t["flags"]:
                raise Conflict("another `tpenv connect` holds the nftables table ip tpenv on this machine",
                               hint="stop it first: `tpenv quit` (or Ctrl-C in its terminal)")
            nft.delete_table(FAMILY, TABLE)
            removed.append("nftables table ip tpenv")
        return removed
    finally:
        if own:
            nft.close()


async def _off_loop(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a thread. A cancel waits for it to end (each iptables command is bounded):
    rules still being added when the guard is told to remove them would outlive it."""
    call = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        await asyncio.wait({call})
        raise


class HostCapture:
    """``async with``; ``close()`` safe twice, then ``wait_closed()``."""

    def __init__(self, cidrs: Iterable[Any], on_connection: OnConnection, *, dns: tuple[str, int] | None = None,
                 nameservers: Iterable[str] = (), exclude: Iterable[Any] = (), mark: int = MARK,
                 backend: str = "auto") -> None:
        """``backend``: ``nft`` (libnftables in this process), ``iptables`` (rules plus a guard
        process), or ``auto`` (nft where libnftables loads)."""
        self.proxied = networks(cidrs)
        v6 = [str(n) for n in self.proxied if n.version == 6]
        if v6:
            raise UsageError(f"the host capture carries IPv4 only; IPv6 ranges {', '.join(v6)} cannot be proxied",
                             hint="list them under never_proxy, or use the ns mode")
        if dns is not None and dns[0] != "127.0.0.1":
            raise UsageError(f"the resolver must listen on 127.0.0.1 for the host capture, not {dns[0]}")
        self.dns, self.nameservers, self.exclude, self.mark = dns, list(nameservers), list(exclude), mark
        self.on_connection = on_connection
        self.log = unit_logger("capture", "host")
        self.backend = backend if backend != "auto" else ("nft" if nftkit.available() else "iptables")
        self.nft: nftkit.Nft | None = None
        self.guard: Any = None
        self.listener: CaptureListener | None = None
        self.port: int | None = None

    async def __aenter__(self) -> "HostCapture":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    async def start(self) -> None:
        if os.geteuid() != 0:
            raise PermanentError("the host capture needs root (it changes this machine's nftables)",
                                 hint="run `sudo tpenv connect`, or use the ns mode: `tpenv connect -- CMD`")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen(512)
            self.port = sock.getsockname()[1]
            self.listener = CaptureListener(sock, self.on_connection, self.log)
            await self.listener.start()
            dns_port = self.dns[1] if self.dns else None
            if self.backend == "nft":
                self.nft = nftkit.Nft()
                # In a thread: sweep runs iptables too (a leftover chain), a subprocess the loop must not wait on.
                for what in await _off_loop(sweep, self.nft):
                    self.log.warning("removed %s, left by an earlier tpenv connect", what)
                self.nft.create_owned_table(FAMILY, TABLE)
                self.nft.apply(rules(self.proxied, self.port, dns_port=dns_port, nameservers=self.nameservers,
                                     exclude=self.exclude, mark=self.mark))
            else:
                self.guard = capture_iptables.start_guard()  # first: no rule may exist without it
                await _off_loop(capture_iptables.install, capture_iptables.rules(
                    self.proxied, self.port, dns_port=dns_port, nameservers=self.nameservers, exclude=self.exclude,
                    mark=self.mark))
        except BaseException:
            sock.close()
            self.close()
            raise
        self.log.info("capturing (%s) %s on 127.0.0.1:%d%s", self.backend,
                      ", ".join(map(str, self.proxied)) or "nothing", self.port,
                      f"; DNS to {', '.join(self.nameservers)} -> 127.0.0.1:{self.dns[1]}"
                      if self.dns and self.nameservers else "")

    def close(self) -> None:
        """Delete the table (closing its socket does it) and stop accepting."""
        if self.nft is not None:
            self.nft.close()
        if self.guard is not None and self.guard.stdin and not self.guard.stdin.closed:
            self.guard.stdin.close()  # EOF: the guard removes the iptables rules and exits
        if self.listener is not None:
            self.listener.close()

    async def wait_closed(self) -> None:
        if self.guard is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.guard.wait)
        if self.listener is not None:
            await self.listener.wait_closed()


__all__ = ["HostCapture", "rules", "sweep", "TABLE"]
