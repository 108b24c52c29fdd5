"""What the ``env`` and ``ns`` captures share: a local proxy on 127.0.0.1 (SOCKS5, HTTP CONNECT,
plain HTTP: tpenv.kits.proxy_server) that dials through the outbound core.

The proxy binds port 0 and the kernel picks the port; the capture says it once started.
"""
from __future__ import annotations

from typing import Self

from tpenv.engine.outbound.core import OutboundCore
from tpenv.kits.proxy_server import ProxyServer


class ProxiedCapture:
    """``async with``: the proxy started on enter, closed on exit (``close()`` then ``wait_closed()``)."""

    def __init__(self, core: OutboundCore) -> None:
        self.core = core
        self.proxy = ProxyServer(core.dial)

    def started(self) -> str:
        """The line logged once the proxy listens (its port is known then)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.proxy.start()
        self.core.log.info("%s", self.started())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    def close(self) -> None:
        self.proxy.close()

    async def wait_closed(self) -> None:
        await self.proxy.wait_closed()


__all__ = ["ProxiedCapture"]
