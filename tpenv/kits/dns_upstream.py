"""Where the local resolver sends queries: the machine's usual nameservers (from resolv.conf,
over UDP, falling back to TCP on truncation) and a cluster DNS server over one long-lived stream
(DNS over TCP, RFC 7766 pipelining: many queries in flight on one connection, matched by id).

Both take a ``mark`` (SO_MARK) for their own sockets: a capture that redirects port 53 skips
marked packets, so tpenv's own upstream queries are not sent back to itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message

from tpenv.errors import TransientError, TunnelDropped

Opener = Callable[[], Awaitable[tuple[Any, Any]]]


def nameservers(resolv_conf: str | Path = "/etc/resolv.conf") -> list[str]:
    """The ``nameserver`` addresses of resolv.conf, in order (IPv6 scope ids dropped)."""
    found: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path(resolv_conf).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    found.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
    return found


def _socket(family: int, kind: int, mark: int | None) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setblocking(False)
    if mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    return sock


class Upstream:
    """Forwards a query's wire form unchanged to the usual nameservers, first answer wins in order."""

    def __init__(self, servers: list[str] | None = None, *, port: int = 53, timeout: float = 3.0,
                 mark: int | None = None) -> None:
        self.servers = nameservers() if servers is None else list(servers)
        self.port, self.timeout, self.mark = port, timeout, mark

    async def query(self, wire: bytes) -> bytes:
        if not self.servers:
            raise TransientError("no nameserver in /etc/resolv.conf to send names outside the cluster to")
        last: Exception | None = None
        for server in self.servers:
            try:
                answer = await asyncio.wait_for(self._udp(server, wire), self.timeout)
                if dns.message.from_wire(answer).flags & dns.flags.TC:
                    answer = await asyncio.wait_for(self._tcp(server, wire), self.timeout)
                return answer
            except (OSError, asyncio.TimeoutError, dns.exception.DNSException) as e:
                last = e
        raise TransientError(f"no nameserver answered ({', '.join(self.servers)}): {last!r}")

    async def _udp(self, server: str, wire: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        with _socket(family, socket.SOCK_DGRAM, self.mark) as sock:
            await loop.sock_connect(sock, (server, self.port))
            await loop.sock_sendall(sock, wire)
            while True:  # ignore stray datagrams whose id is not ours
                data = await loop.sock_recv(sock, 65535)
                if data[:2] == wire[:2]:
                    return data

    async def _tcp(self, server: str, wire: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        sock = _socket(family, socket.SOCK_STREAM, self.mark)
        await loop.sock_connect(sock, (server, self.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(struct.pack("!H", len(wire)) + wire)
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(size)
        finally:
            writer.close()


class StreamDns:
    """DNS over one stream (``opener()`` -> reader, writer), reopened when it breaks; queries
    pipelined and matched by id. ``query(message)`` returns the answer message."""

    def __init__(self, opener: Opener, *, timeout: float = 5.0) -> None:
        self._opener, self.timeout = opener, timeout
        self._writer: Any = None
        self._reader_task: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._lock = asyncio.Lock()

    async def _ensure(self) -> Any:
        async with self._lock:
            if self._writer is None:
                reader, self._writer = await self._opener()
                self._reader_task = asyncio.ensure_future(self._read(reader, self._writer))
            return self._writer

    async def _read(self, reader: Any, writer: Any) -> None:
        error: Exception = TunnelDropped("the cluster DNS stream closed")
        try:
            while True:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(size)
                fut = self._pending.pop(struct.unpack("!H", data[:2])[0], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
        except Exception as e:  # any end of the stream fails what waits on it; the next query reopens
            error = TunnelDropped(f"the cluster DNS stream broke: {e!r}")
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(error)
            self._pending.clear()

    async def query(self, message: dns.message.Message) -> dns.message.Message:
        for attempt in (1, 2):  # a stream that broke while idle gets one fresh try
            writer = await self._ensure()
            qid = random.randrange(65536)
            while qid in self._pending:
                qid = random.randrange(65536)
            message.id = qid
            wire = message.to_wire()
            fut = asyncio.get_running_loop().create_future()
            self._pending[qid] = fut
            try:
                try:
                    writer.write(struct.pack("!H", len(wire)) + wire)
                except Exception as e:  # a channel closed under us: drop it, the retry reopens
                    if self._writer is writer:
                        self._writer = None
                    raise TunnelDropped(f"the cluster DNS stream broke: {e!r}") from e
                return dns.message.from_wire(await asyncio.wait_for(fut, self.timeout))
            except TunnelDropped:
                if attempt == 2:
                    raise
            except asyncio.TimeoutError as e:
                raise TransientError(f"the cluster DNS did not answer within {self.timeout:g}s") from e
            finally:
                self._pending.pop(qid, None)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def wait_closed(self) -> None:
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)


__all__ = ["Upstream", "StreamDns", "nameservers"]
