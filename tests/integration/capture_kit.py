"""Helpers of the capture tests: private network namespaces (root) and a process that runs a
capture with a callback answering, over HTTP, which destination it was handed.

    python -m tests.integration.capture_kit host CIDR [CIDR...]   # prints "ready PORT" when capturing
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import sys
from collections.abc import Iterator


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=60)


@contextlib.contextmanager
def netns(prefix: str = "tpc") -> Iterator[str]:
    """A fresh network namespace with loopback up; deleted afterwards (with all it holds)."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def state(ns: str) -> dict[str, str]:
    """What a capture could change in a namespace: nftables, iptables, links, addresses, routes."""
    def run(*a: str) -> str:
        return sh("ip", "netns", "exec", ns, *a, check=False).stdout
    return {"nft": run("nft", "list", "ruleset"), "iptables": run("iptables-save"),
            "links": run("ip", "-o", "link"), "addrs": run("ip", "-o", "addr"),
            "routes": run("ip", "route", "show", "table", "all")}


async def answer_with_destination(dst_ip: str, dst_port: int, reader, writer) -> None:
    """The stand-in for the core's callback: an HTTP answer naming the destination it was given."""
    await reader.readuntil(b"\r\n\r\n")
    body = f"captured {dst_ip}:{dst_port}\n".encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    await writer.drain()


async def _host(cidrs: list[str]) -> None:
    from tpenv.kits.capture_host import HostCapture

    async with HostCapture(cidrs, answer_with_destination) as cap:
        print(f"ready {cap.port}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if sys.argv[1] == "host":
        asyncio.run(_host(sys.argv[2:]))
