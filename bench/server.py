#!/usr/bin/env python3
"""The bench's HTTP server: the app in the cluster and the developer's handler on the host.

Standard library only (HTTP/2 and gRPC through tpenv-echo's ``serve_h2`` when it is importable:
in the tpenv/testapp image, or on the host from tests/cluster/apps with ``h2`` installed).

    GET  /?size=N   200 with an N-byte body (default 1024), incompressible bytes; up to 64 KiB in
                    one write with its headers, apart with &writes=2 (answer_parts)
    POST /          reads the body (Content-Length or chunked), answers {"received": n}
    h2c / gRPC      tpenv-echo's answer (a small JSON; gRPC status 0)

HTTP/1.1 keep-alive; no logging per request. Ports: $PORT or --port, comma-separated (0: any; the
first port is printed on stdout as the first line). Same code on both ends so a figure through
tpenv and its baseline differ only by the path, not by the server.

Every HTTP/1 answer says who answered (``X-Bench-Side``) and how the connection arrived
(``X-Bench-Hop``): ``proxy`` from loopback (the agent, or a proxy in the pod, dials the app on
127.0.0.1), ``direct`` from anywhere else (a caller's pod IP through a Service). The in-cluster
"direct" baseline is only direct when no proxy sits in front of the port it dials: the bench
checks this header rather than assuming it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from urllib.parse import parse_qs, urlsplit

for _p in ("/opt/tpenv-apps", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "cluster", "apps")):
    if os.path.isdir(_p) and _p not in sys.path:
        sys.path.insert(0, _p)

H2_PREFACE_LINE = b"PRI * HTTP/2.0\r\n"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BLOCK = os.urandom(1 << 20)
SIDE = os.environ.get("BENCH_SIDE", "host").encode()  # who answered: the cluster's app or the laptop
LOOPBACK = ("127.", "::1", "::ffff:127.")
MAX_HEAD = 64 * 1024


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> int:
    total = 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\n")).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readuntil(b"\n")).strip():
                    pass
                return total
            left = size
            while left:
                chunk = await reader.read(min(left, 1 << 20))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(chunk)
            await reader.readexactly(2)
            total += size
    left = int(headers.get("content-length", "0") or 0)
    while left:
        chunk = await reader.read(min(left, 1 << 20))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(chunk)
        total += len(chunk)
    return total


async def send_body(writer: asyncio.StreamWriter, size: int) -> None:
    while size > 0:
        n = min(size, len(BLOCK))
        writer.write(BLOCK[:n] if n < len(BLOCK) else BLOCK)
        size -= n
        await writer.drain()


SMALL = 64 * 1024  # an answer up to this size goes out in one write (unless ?writes=2)


def answer_parts(head: bytes, size: int, *, head_only: bool = False, two: bool = False) -> list[bytes]:
    """The writes of a GET answer (the body of a larger one follows from send_body).

    A small answer leaves in one write, headers and body together, as nginx (one writev) and Go's
    net/http (one flush of its buffered writer) send it: one segment, one wake-up of whoever reads
    it. ``?writes=2`` keeps them apart, as Python's http.server does (its headers, then the
    handler's body): the two-segment answer a proxy in the path may forward as two (issue 13's
    second passthrough / HAProxy row)."""
    if head_only or size > len(BLOCK):  # HEAD; or a body send_body writes in blocks
        return [head]
    if two or size > SMALL:
        return [head, BLOCK[:size]]
    return [head + BLOCK[:size]]


async def serve_http1(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    hop = b"proxy" if peer and str(peer[0]).startswith(LOOPBACK) else b"direct"
    side = SIDE + b"\r\nX-Bench-Hop: " + hop  # both headers on every answer
    while head:
        lines = head.split(b"\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        method, target, version = parts[0], parts[1].decode("latin-1"), parts[2]
        headers: dict[str, str] = {}
        for h in lines[1:]:
            if h:
                name, _, value = h.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        received = await read_body(reader, headers)
        conn = headers.get("connection", "").lower()
        keep = "close" not in conn if version == b"HTTP/1.1" else "keep-alive" in conn
        tail = b"" if keep else b"Connection: close\r\n"
        if method == b"POST" or method == b"PUT":
            body = b'{"received": %d}\n' % received
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Bench-Side: %s\r\nContent-Length: %d\r\n%s\r\n%s"
                         % (side, len(body), tail, body))
        else:
            q = parse_qs(urlsplit(target).query)
            try:
                size = int(q.get("size", ["1024"])[0])
            except ValueError:
                size = 1024
            two = q.get("writes", ["1"])[0] == "2"
            top = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nX-Bench-Side: %s\r\n"
                   b"Content-Length: %d\r\n%s\r\n" % (side, size, tail))
            for part in answer_parts(top, size, head_only=method == b"HEAD", two=two):
                writer.write(part)
            if method != b"HEAD" and size > len(BLOCK):
                await send_body(writer, size)
        await writer.drain()
        if not keep:
            return
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        if head == H2_PREFACE[:len(head)] and head.startswith(H2_PREFACE_LINE):
            await reader.readexactly(len(H2_PREFACE) - len(head))
            import echo  # tpenv-echo's HTTP/2 + gRPC answers

            echo.QUIET = True
            await echo.serve_h2(reader, writer)
        else:
            await serve_http1(head, reader, writer)
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ImportError):
        pass
    finally:
        writer.close()


async def amain(host: str, ports: list[int]) -> None:
    servers = [await asyncio.start_server(handle, host, port, reuse_address=True, limit=MAX_HEAD, backlog=1024)
               for port in ports]
    print(servers[0].sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", default=os.environ.get("PORT", "8080"), help="port(s), comma-separated")
    p.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    args = p.parse_args(argv)
    asyncio.run(amain(args.host, [int(x) for x in str(args.port).split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
