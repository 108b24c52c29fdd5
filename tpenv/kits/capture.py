"""What the captures of ``tpenv connect`` share (``capture_host``: root, nftables on the machine;
``capture_ns``: no root, one command in its own namespaces): a listener whose accepted
connections were redirected to it, their original destination, and the hand-off.

The hand-off is the core's callback, one per captured TCP connection::

    async def on_connection(dst_ip: str, dst_port: int, reader, writer) -> None

``reader``/``writer`` are asyncio streams of the captured connection; the callback owns them
(the listener closes the writer once the callback returns, whatever it did).
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from tpenv.errors import UsageError
from tpenv.kits.splice import splice

OnConnection = Callable[[str, int, Any, Any], Awaitable[None]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; the same number at SOL_IPV6 (IP6T_SO_ORIGINAL_DST)
MARK = 0x74706E76  # "tpnv": SO_MARK of tpenv's own sockets, skipped by every capture rule


def networks(cidrs: Iterable[str | Network]) -> list[Network]:
    """Parsed CIDRs (host bits refused, as the config does); UsageError naming the bad one."""
    out: list[Network] = []
    for c in cidrs:
        try:
            out.append(c if isinstance(c, (ipaddress.IPv4Network, ipaddress.IPv6Network))
                       else ipaddress.ip_network(str(c).strip()))
        except ValueError as e:
            raise UsageError(f"bad CIDR {c!r}: {e}", hint="write it like 10.96.0.0/16") from e
    return out


def contains(nets: Iterable[Network], ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in nets)


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The address a redirected connection was sent to, from conntrack (SO_ORIGINAL_DST)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.SOL_IPV6, SO_ORIGINAL_DST, 28)
        port, = struct.unpack("!H", raw[2:4])
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, = struct.unpack("!H", raw[2:4])
    return socket.inet_ntoa(raw[4:8]), port


def mark(sock: socket.socket, value: int = MARK) -> None:
    """Tag one of tpenv's own sockets so the capture rules let it pass (needs CAP_NET_ADMIN)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, value)


async def dial_direct(dst_ip: str, dst_port: int, reader: Any, writer: Any, *, use_mark: bool = False) -> None:
    """A destination tpenv does not proxy: dialled from this process as any program would, then
    spliced. ``use_mark`` when this process's own connections would otherwise be captured."""
    family = socket.AF_INET6 if ":" in dst_ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if use_mark:
            mark(sock)
        await asyncio.get_running_loop().sock_connect(sock, (dst_ip, dst_port))
    except OSError:
        sock.close()
        return  # the caller sees its connection closed, as with a refused connect
    up_r, up_w = await asyncio.open_connection(sock=sock)
    await splice(reader, writer, up_r, up_w)


class CaptureListener:
    """Serves a listening socket whose connections were redirected to it: each one's original
    destination goes to ``route(dst_ip, dst_port, reader, writer)``. ``close()`` safe twice."""

    def __init__(self, sock: socket.socket, route: OnConnection, log: logging.Logger | logging.LoggerAdapter) -> None:
        self.sock, self.route, self.log = sock, route, log
        self.server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self.count = 0

    async def start(self) -> None:
        self.sock.setblocking(False)
        self.server = await asyncio.start_server(self._accepted, sock=self.sock)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                dst_ip, dst_port = original_dst(writer.get_extra_info("socket"))
            except OSError as e:  # connected to the listener itself, not redirected: nothing to do
                self.log.debug("a connection without an original destination: %s", e)
                return
            self.count += 1
            await self.route(dst_ip, dst_port, reader, writer)
        except Exception as e:  # one connection's failure must not end the listener
            self.log.warning("captured connection failed: %s", e)
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._tasks):
            t.cancel()

    async def wait_closed(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def router(proxied: list[Network], on_connection: OnConnection, *, use_mark: bool = False) -> OnConnection:
    """Cluster destinations to the core's callback, every other one dialled directly."""

    async def route(dst_ip: str, dst_port: int, reader: Any, writer: Any) -> None:
        if contains(proxied, dst_ip):
            await on_connection(dst_ip, dst_port, reader, writer)
        else:
            await dial_direct(dst_ip, dst_port, reader, writer, use_mark=use_mark)

    return route


__all__ = ["OnConnection", "CaptureListener", "original_dst", "mark", "networks", "contains", "router",
           "dial_direct", "MARK"]
