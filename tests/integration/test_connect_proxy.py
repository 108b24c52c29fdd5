"""The env-mode proxy over real sockets (tpenv/kits/proxy_server.py): SOCKS5 with a remote name,
HTTP CONNECT, and an absolute-form HTTP request, each reaching a local HTTP server through a
dial function that maps names the way the outbound core does; refusals come back as SOCKS codes
and HTTP statuses, never as a hang."""
from __future__ import annotations

import asyncio
import struct

import pytest

from tests.tracked_server import TrackedServer
from tpenv.errors import Forbidden, NotFound
from tpenv.kits.proxy_server import ProxyServer


class Http(TrackedServer):
    """Answers each request with its own request line and Host header."""

    async def handle(self, reader, writer):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        line = head.split("\r\n")[0]
        host = next((h.split(":", 1)[1].strip() for h in head.split("\r\n") if h.lower().startswith("host:")), "")
        body = f"{line} host={host}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()


@pytest.fixture
async def proxy():
    async with Http() as http:
        async def dial(host, port):
            if host == "forbidden.shop":
                raise Forbidden("the relay refused it")
            if host != "hello.shop":
                raise NotFound(f"{host}: no such name")
            return await asyncio.open_connection("127.0.0.1", http.port)

        async with ProxyServer(dial) as server:
            yield server


async def socks_connect(port: int, host: str, dport: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    writer.write(b"\x05\x01\x00\x03" + bytes([len(host)]) + host.encode() + struct.pack("!H", dport))
    reply = await reader.readexactly(10)
    return reader, writer, reply[1]


# --- stage 1: SOCKS5 with the name resolved by the proxy (socks5h) --------------------------------

async def test_socks5_connect_by_name(proxy):
    reader, writer, code = await socks_connect(proxy.port, "hello.shop", 80)
    assert code == 0
    writer.write(b"GET /x HTTP/1.1\r\nHost: hello.shop\r\n\r\n")
    assert (await reader.read(4096)).endswith(b"GET /x HTTP/1.1 host=hello.shop")
    writer.close()


async def test_socks5_refusals_have_their_codes(proxy):
    *_, code = await socks_connect(proxy.port, "forbidden.shop", 80)
    assert code == 2  # connection not allowed by ruleset
    *_, code = await socks_connect(proxy.port, "nope.shop", 80)
    assert code == 4  # host unreachable


# --- stage 2: HTTP proxies: CONNECT and absolute-form ---------------------------------------------

async def test_http_connect_and_absolute_form(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"CONNECT hello.shop:443 HTTP/1.1\r\nHost: hello.shop:443\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.write(b"GET /tunnel HTTP/1.1\r\nHost: hello.shop\r\n\r\n")
    assert (await reader.read(4096)).endswith(b"GET /tunnel HTTP/1.1 host=hello.shop")
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET http://hello.shop/plain?q=1 HTTP/1.1\r\nHost: hello.shop\r\nProxy-Connection: keep-alive\r\n\r\n")
    assert (await reader.read(4096)).endswith(b"GET /plain?q=1 HTTP/1.1 host=hello.shop")
    writer.close()


async def test_http_refusal_is_a_status(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET http://forbidden.shop/ HTTP/1.1\r\nHost: forbidden.shop\r\n\r\n")
    answer = await reader.read(4096)
    assert answer.startswith(b"HTTP/1.1 403") and b"the relay refused it" in answer
    writer.close()
