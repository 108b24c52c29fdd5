"""The ``ns`` capture under ``tpenv up``: each handler in its own user, network and mount
namespaces (tpenv.kits.capture_ns), as ``tpenv connect -- CMD`` runs a command.

A handler is a process of the reconciler's process group, restarted by it, so its namespaces
are served by a small process started in its place (``python -m tpenv.kits.ns_handler``), which
reaches the unit's core through two local doors: the core's resolver (DNS) and a local SOCKS5
proxy on 127.0.0.1 (cluster destinations, by address, carried by the relay). The handler's
intercepted port is delivered inside its namespace (the ns capture's dialer).
"""
from __future__ import annotations

import sys
from collections.abc import Iterable

from tpenv.engine.outbound.proxied import ProxiedCapture


class NsHandlers(ProxiedCapture):
    """``async with``: the proxy the handlers' wrappers dial through; ``wrap(argv)`` their argv."""

    def started(self) -> str:
        return f"ns mode: handlers run in their own namespaces, through 127.0.0.1:{self.proxy.port}"

    def wrap(self, argv: list[str], inbound: Iterable[int] = ()) -> list[str]:
        host, port = self.core.resolver_address
        out = [sys.executable, "-m", "tpenv.kits.ns_handler", "--socks", f"127.0.0.1:{self.proxy.port}",
               "--dns", f"{host}:{port}"]
        for cidr in self.core.cidrs:
            out += ["--cidr", str(cidr)]
        for domain in self.core.search_list:
            out += ["--search", domain]
        for p in inbound:
            out += ["--inbound", str(p)]
        return [*out, "--", *argv]


__all__ = ["NsHandlers"]
