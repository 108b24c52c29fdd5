"""How a client WebSocket (:mod:`tpenv.kits.ws_client`) is opened: the HTTP/1.1 upgrade request with
its ``Sec-WebSocket-Key`` and the ``Sec-WebSocket-Accept`` the answer must carry (RFC 6455 4.1),
and the TCP path to the server through the kubeconfig's HTTP(S) ``proxy-url`` (``CONNECT``, then
TLS to the API server inside the tunnel), as the ``websockets`` library did it before.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl as ssl_module
from typing import Any
from urllib.parse import urlsplit

from tpenv.errors import ClusterUnreachable
from tpenv.kits.pf_common import UpgradeAnswer

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def upgrade_request(url: str, subprotocol: str, headers: dict[str, str]) -> tuple[bytes, bytes]:
    """The GET that asks for the upgrade, and the ``Sec-WebSocket-Accept`` the answer must carry."""
    u = urlsplit(url)
    key = base64.b64encode(os.urandom(16))
    target = u.path + (f"?{u.query}" if u.query else "")
    lines = [f"GET {target} HTTP/1.1", f"Host: {u.netloc}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13",
             f"Sec-WebSocket-Protocol: {subprotocol}", "User-Agent: tpenv"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), accept


async def connect_via_proxy(conn: asyncio.BufferedProtocol, proxy: str, host: str, port: int, ssl: Any,
                             server_hostname: str | None) -> None:
    """TCP to an HTTP(S) proxy, ``CONNECT host:port``, then TLS to the server inside it."""
    p = urlsplit(proxy)
    if p.scheme not in ("http", "https"):
        raise ClusterUnreachable(f"the kubeconfig's proxy-url {proxy!r} is not an http(s) proxy",
                                 hint="tpenv's port-forward reaches the API server through HTTP(S) proxies only")
    loop = asyncio.get_running_loop()
    answer = UpgradeAnswer()
    got: asyncio.Future[None] = loop.create_future()

    class Tunnel(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            answer.feed(data)
            if answer.status is not None and not got.done():
                got.set_result(None)

        def connection_lost(self, exc: Exception | None) -> None:
            if not got.done():
                got.set_exception(exc or ConnectionResetError("the proxy closed before answering CONNECT"))

    auth = {}
    if p.username:
        auth["Proxy-Authorization"] = "Basic " + base64.b64encode(
            f"{p.username}:{p.password or ''}".encode()).decode()
    head = [f"CONNECT {host}:{port} HTTP/1.1", f"Host: {host}:{port}"] + [f"{k}: {v}" for k, v in auth.items()]
    transport, _ = await loop.create_connection(Tunnel, p.hostname, p.port or (443 if p.scheme == "https" else 80),
                                                ssl=ssl_module.create_default_context() if p.scheme == "https" else None)
    try:
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode())
        await got
        if answer.status is None or not 200 <= answer.status < 300:
            raise ClusterUnreachable(f"the proxy {p.hostname}:{p.port} refused CONNECT {host}:{port} "
                                     f"(HTTP {answer.status})")
        if ssl is not None:
            transport = await loop.start_tls(transport, conn, ssl, server_hostname=server_hostname or host)
        else:
            transport.set_protocol(conn)
        conn.connection_made(transport)
    except BaseException:
        transport.abort()
        raise


__all__ = ["upgrade_request", "connect_via_proxy"]
