"""A local proxy speaking SOCKS5 (RFC 1928, CONNECT, names resolved by us: ``socks5h://``) and
HTTP (``CONNECT host:port`` tunnels, and absolute-form requests ``GET http://host/...`` as
``HTTP_PROXY`` clients send for plain http URLs) on one port; the first byte tells which.

    async with ProxyServer(dial) as proxy:       # dial(host, port) -> (reader, writer)
        proxy.port

No authentication: it listens on 127.0.0.1 only, for this machine's processes (the same trust as
a port-forward). UDP ASSOCIATE and BIND are refused with the codes RFC 1928 gives.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from tpenv.errors import Forbidden, NotFound, TpenvError
from tpenv.kits.splice import CHUNK, splice

Dial = Callable[[str, int], Awaitable[tuple[Any, Any]]]
log = logging.getLogger("tpenv.proxy")

# SOCKS5 reply codes (RFC 1928 §6)
OK, FAILURE, NOT_ALLOWED, HOST_UNREACHABLE, REFUSED, NOT_SUPPORTED, ATYP_NOT_SUPPORTED = 0, 1, 2, 4, 5, 7, 8


def _socks_code(e: Exception) -> int:
    return NOT_ALLOWED if isinstance(e, Forbidden) else HOST_UNREACHABLE if isinstance(e, NotFound) else REFUSED


class ProxyServer:
    """``async with``; ``close()`` safe twice, then ``wait_closed()``; ``port`` read back."""

    def __init__(self, dial: Dial, host: str = "127.0.0.1", port: int = 0) -> None:
        self._dial, self.host, self._port = dial, host, port
        self.port: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()

    async def start(self) -> "ProxyServer":
        try:
            self._server = await asyncio.start_server(self._accept, self.host, self._port, limit=CHUNK)
        except OSError as e:
            raise TpenvError(f"cannot listen on {self.host}:{self._port} for the proxy: {e.strerror}") from e
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> "ProxyServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in self._conns:
            t.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._conns, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.readexactly(1)
            if first == b"\x05":
                await self._socks5(reader, writer)
            else:
                await self._http(first, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, UnicodeDecodeError) as e:
            log.debug("proxy client gone or malformed: %r", e)
        finally:
            writer.close()

    # --- SOCKS5 --------------------------------------------------------------------------------
    async def _socks5(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (count,) = await reader.readexactly(1)
        methods = await reader.readexactly(count)
        if 0 not in methods:  # "no authentication" only
            writer.write(b"\x05\xff")
            return
        writer.write(b"\x05\x00")
        ver, cmd, _, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        elif atyp == 3:
            (size,) = await reader.readexactly(1)
            host = (await reader.readexactly(size)).decode("idna")
        else:
            writer.write(self._reply(ATYP_NOT_SUPPORTED))
            return
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        if ver != 5 or cmd != 1:  # CONNECT only
            writer.write(self._reply(NOT_SUPPORTED))
            return
        try:
            up_r, up_w = await self._dial(host, port)
        except TpenvError as e:
            log.info("SOCKS %s:%s: %s", host, port, e)
            writer.write(self._reply(_socks_code(e)))
            return
        writer.write(self._reply(OK))
        await splice(reader, writer, up_r, up_w)

    @staticmethod
    def _reply(code: int) -> bytes:
        return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])

    # --- HTTP ----------------------------------------------------------------------------------
    async def _http(self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = first + await reader.readuntil(b"\r\n\r\n")
        request_line, _, rest = head.partition(b"\r\n")
        method, target, version = request_line.decode("latin-1").split(" ", 2)
        connect = method.upper() == "CONNECT"
        if not connect and not target.lower().startswith("http://"):
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            return
        authority, _, path = (target, "", "") if connect else target[7:].partition("/")
        host, port = _split_host_port(authority, 443 if connect else 80)
        try:
            up_r, up_w = await self._dial(host, port)
        except TpenvError as e:
            writer.write(_status(e))
            return
        if connect:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await splice(reader, writer, up_r, up_w)
            return
        # One request per connection to the origin: the next request on this client connection
        # may name another host, so ask both sides to close after this one.
        headers = [h for h in rest.split(b"\r\n") if h and not h.lower().startswith((b"proxy-connection:", b"connection:"))]
        up_w.write(f"{method} /{path} {version}\r\n".encode("latin-1") + b"\r\n".join(headers)
                   + b"\r\nConnection: close\r\n\r\n")
        await splice(reader, writer, up_r, up_w)


def _split_host_port(value: str, default: int) -> tuple[str, int]:
    if value.startswith("["):
        host, _, port = value[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    return host, int(port) if port else default


def _status(e: Exception) -> bytes:
    code = "403 Forbidden" if isinstance(e, Forbidden) else "502 Bad Gateway"
    body = f"tpenv: {e}\n".encode()
    return (f"HTTP/1.1 {code}\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


__all__ = ["ProxyServer"]
