"""Helpers of the capture tests: private network namespaces (root), a non-root user's Python, a
static Go client, and a process that runs a capture with a callback answering, over HTTP, which
destination it was handed (the stand-in for the core of ``tpenv connect``).

    python -m tests.integration.capture_kit host [--backend=iptables] CIDR...   # prints "ready PORT" when capturing
    python -m tests.integration.capture_kit ns CIDR -- CMD ...    # CMD in its namespaces; exits with its status
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import subprocess
import os
import site
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOUBLE_ANSWER = "10.199.0.7"  # what the resolver double answers for every name


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


class ResolverDouble(asyncio.DatagramProtocol):
    """The stand-in for the core's resolver: every A query gets DOUBLE_ANSWER (TTL 5), anything
    else an empty answer. It only has to prove that queries reach it."""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, query: bytes, addr) -> None:
        end = query.index(b"\0", 12) + 5  # the question: name, type, class
        qtype, = struct.unpack("!H", query[end - 4:end - 2])
        header = query[:2] + b"\x81\x80" + b"\x00\x01" + (b"\x00\x01" if qtype == 1 else b"\x00\x00") + b"\x00" * 4
        record = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04" + socket.inet_aton(DOUBLE_ANSWER)
        self.transport.sendto(header + query[12:end] + (record if qtype == 1 else b""), addr)


async def _ns(cidrs: list[str], command: list[str]) -> int:
    from tpenv.kits.capture_ns import NsCommand

    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(ResolverDouble,
                                                                              local_addr=("127.0.0.1", 0))
    try:
        dns = ("127.0.0.1", transport.get_extra_info("sockname")[1])
        return await NsCommand(command, cidrs, answer_with_destination, dns=dns).run()
    finally:
        transport.close()


def as_user(user: str, *argv: str) -> list[str]:
    """``argv`` (a Python module run) as ``user``, with this checkout and its venv's packages.
    The system's python3 of the same version: a venv's interpreter may live where the user cannot
    go (here under /root), and the namespace helper re-executes ``sys.executable``."""
    py = "/usr/bin/python3"
    want = f"{sys.version_info.major}.{sys.version_info.minor}"
    got = sh(py, "-c", "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')", check=False)
    assert got.stdout.strip() == want, f"the tests need {py} {want} (the venv's version) for user {user}: apt-get install python3"
    # The checkout's two packages (tpenv, and agent/tpenv_agent which the client imports too): the
    # venv finds them through its editable-install .pth hooks, which PYTHONPATH entries never run.
    path = os.pathsep.join([str(ROOT), str(ROOT / "agent"), *site.getsitepackages()])
    return ["runuser", "-u", user, "--", "env", f"PYTHONPATH={path}", py, *argv]


def static_client(out_dir: Path) -> Path:
    """tests/integration/static_client built static (CGO_ENABLED=0) with the project's Go."""
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    import build  # tests/cluster/build.py: the Go toolchain (fetched when none is installed), caches

    binary = out_dir / "getter"
    subprocess.run([build.go_binary(), "build", "-trimpath", "-o", str(binary), "."], env=build.go_env(),
                   cwd=ROOT / "tests" / "integration" / "static_client", check=True, capture_output=True, timeout=600)
    return binary


async def _host(cidrs: list[str]) -> None:
    from tpenv.kits.capture_host import HostCapture

    backend = "auto"
    if cidrs[0].startswith("--backend="):
        backend, cidrs = cidrs[0].split("=", 1)[1], cidrs[1:]
    async with HostCapture(cidrs, answer_with_destination, backend=backend) as cap:
        print(f"ready {cap.port}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if sys.argv[1] == "host":
        asyncio.run(_host(sys.argv[2:]))
    elif sys.argv[1] == "ns":
        from tpenv.errors import TpenvError

        split = sys.argv.index("--")
        try:
            sys.exit(asyncio.run(_ns(sys.argv[2:split], sys.argv[split + 1:])))
        except TpenvError as e:  # as the CLI shows it: the message, then what to do
            print(f"tpenv: {e}" + (f"\n  hint: {e.hint}" if e.hint else ""), file=sys.stderr)
            sys.exit(1)
