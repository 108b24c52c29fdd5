"""A DNS server on 127.0.0.1: UDP and TCP on the same port (port 0, read back), each query handed
to an ``answer(wire) -> wire | None`` coroutine. Transport only: what to answer is the caller's
(``tpenv.kits.dns_resolver.Resolver``).

    async with DnsServer(resolver.answer, fast=resolver.answer_now) as server:
        host, port = server.address

UDP answers larger than 512 bytes (or the client's EDNS size) are truncated with TC set so the
client retries over TCP, as RFC 1035/6891 ask.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable

import dns.exception
import dns.flags
import dns.message

from tpenv.errors import TpenvError

Answer = Callable[[bytes], Awaitable[bytes | None]]
log = logging.getLogger("tpenv.dns")


def truncate_for_udp(query: bytes, answer: bytes) -> bytes:
    """``answer`` as it may go over UDP: within the client's payload size, else an empty answer
    with TC set (the client asks again over TCP)."""
    if len(answer) <= 512:  # within any client's limit: no need to parse the query
        return answer
    try:
        q = dns.message.from_wire(query)
        limit = max(512, q.payload) if q.edns >= 0 else 512
    except dns.exception.DNSException:
        limit = 512
    if len(answer) <= limit:
        return answer
    try:
        r = dns.message.from_wire(answer)
    except dns.exception.DNSException:
        return answer[:limit]
    r.answer, r.authority, r.additional = [], [], []
    r.flags |= dns.flags.TC
    return r.to_wire()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: "DnsServer") -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        # A cached answer goes out from here: a dict lookup and one sendto, no task (what a
        # cached lookup costs is what the loop does per datagram: docs/performance.md "connect").
        fast = self.server.fast(data) if self.server.fast is not None else None
        if fast is not None and len(fast) <= 512 and self.transport is not None:
            self.server.queries += 1
            self.transport.sendto(fast, addr)
            return
        self.server._spawn(self._reply(data, addr))

    async def _reply(self, data: bytes, addr: tuple) -> None:
        answer = await self.server._answer(data)
        if answer is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(truncate_for_udp(data, answer), addr)


class DnsServer:
    """``async with``; ``close()`` safe twice, then ``wait_closed()``. ``address``: (host, port)."""

    def __init__(self, answer: Answer, host: str = "127.0.0.1", port: int = 0, *,
                 fast: Callable[[bytes], bytes | None] | None = None) -> None:
        """``fast(wire)``: an answer known without waiting (a cache hit), or None."""
        self._answer_fn, self.host, self._port, self.fast = answer, host, port, fast
        self.address: tuple[str, int] | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.queries = 0

    async def start(self) -> "DnsServer":
        loop = asyncio.get_running_loop()
        # UDP first on port 0, then TCP on the same number; another program can hold that TCP
        # port, so try a few fresh UDP ports before giving up.
        last: OSError | None = None
        for _ in range(8):
            try:
                self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(self.host, self._port),
                                                                    family=socket.AF_INET)
                port = self._udp.get_extra_info("sockname")[1]
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port, reuse_address=True)
                self.address = (self.host, port)
                return self
            except OSError as e:
                last = e
                if self._udp is not None:
                    self._udp.close()
                    self._udp = None
                if self._port:
                    break
        raise TpenvError(f"cannot listen for DNS on {self.host}:{self._port}: {last}",
                         hint="another program holds the port") from last

    async def __aenter__(self) -> "DnsServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for t in self._tasks:
            t.cancel()

    async def wait_closed(self) -> None:
        if self._tcp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 2)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, data: bytes) -> bytes | None:
        self.queries += 1
        try:
            return await self._answer_fn(data)
        except Exception:  # one bad query must not end the server; the answerer logs its own errors
            log.exception("DNS query failed")
            return None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # RFC 7766: several queries per connection, answered as they complete (pipelined).
        lock = asyncio.Lock()

        async def one(data: bytes) -> None:
            answer = await self._answer(data)
            if answer is not None:
                async with lock:
                    writer.write(struct.pack("!H", len(answer)) + answer)
                    await writer.drain()

        pending: set[asyncio.Task] = set()
        try:
            while True:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                task = asyncio.ensure_future(one(await reader.readexactly(size)))
                pending.add(task)
                task.add_done_callback(pending.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            await asyncio.gather(*pending, return_exceptions=True)
            writer.close()


__all__ = ["DnsServer", "truncate_for_udp"]
