"""Issue 12: "any address" listeners take IPv4 and IPv6 callers on one port (IPv6-only clusters)."""
from __future__ import annotations

import asyncio
import socket

import pytest

from tpenv_agent.bind import listen_socket


def _have_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _have_ipv6(), reason="this machine's kernel has IPv6 disabled: nothing dual-stack to check")
async def test_any_address_accepts_ipv4_and_ipv6_on_one_port():
    # Stage 1: "0.0.0.0" (what injection passes) and port 0: one socket, one port.
    seen: list[str] = []

    async def serve(reader, writer):
        seen.append(writer.get_extra_info("peername")[0])
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, sock=listen_socket("0.0.0.0", 0))
    port = server.sockets[0].getsockname()[1]
    assert len(server.sockets) == 1
    # Stage 2: a caller over each family reaches it.
    try:
        for host in ("127.0.0.1", "::1"):
            r, w = await asyncio.open_connection(host, port)
            assert await r.read() == b"ok"
            w.close()
        assert seen[0].endswith("127.0.0.1") and seen[1] == "::1"
    finally:
        server.close()
        await server.wait_closed()


def test_a_specific_address_binds_only_that_family():
    s = listen_socket("127.0.0.1", 0)
    try:
        assert s.family == socket.AF_INET
    finally:
        s.close()
