"""Listening sockets that take IPv4 and IPv6 alike (issue 12: IPv6-only clusters).

"Any address" (``0.0.0.0``, ``::``, ``""``, ``*``) is one IPv6 socket with ``IPV6_V6ONLY``
off, so it accepts IPv4 callers too (as mapped addresses), and one socket means one port even
when the port is 0. Where the kernel has no IPv6 (``ipv6.disable=1``) it falls back to
``0.0.0.0``. A specific address binds just that address, of its own family.
"""
from __future__ import annotations

import socket

ANY = ("0.0.0.0", "::", "", "*")


def listen_socket(host: str, port: int, *, backlog: int = 1024) -> socket.socket:
    """A bound, listening, non-blocking TCP socket (SO_REUSEADDR) for asyncio's ``sock=``."""
    host = host.strip("[]")
    if host in ANY:
        try:
            return _bound(socket.AF_INET6, "::", port, backlog, v6only=False)
        except OSError:
            return _bound(socket.AF_INET, "0.0.0.0", port, backlog)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _bound(family, host, port, backlog)


def _bound(family: int, host: str, port: int, backlog: int, *, v6only: bool | None = None) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6only is not None:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
        return s
    except BaseException:
        s.close()
        raise
