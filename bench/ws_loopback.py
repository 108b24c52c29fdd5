#!/usr/bin/env python3
"""The port-forward WebSocket client alone, on loopback: the ``websockets`` library's client loop
(tpenv's transport before kits/ws_client.py) against tpenv's own client, side by side in one run.

    .venv/bin/python bench/ws_loopback.py [--mib 128] [--frame 29696] [--rounds 2] [--plain]

A server process (the ``websockets`` library, TLS with a throwaway CA unless ``--plain``) speaks
the kubelet's ``v4.channel.k8s.io``: the port on channels 0 and 1, then ``--mib`` MiB on channel
0 in binary frames of ``--frame`` bytes (29 KiB: what the API server's frames measured), written
pre-framed in 1 MiB blocks so that the server is not the bottleneck, then a clean close. The client (this process) downloads it through

- ``library``: ``websockets``' ``connect`` + ``recv()`` per message, channel byte cut off, the data
  to a StreamReaderProtocol: what tpenv's PortForwardTransport did until kits/ws_client.py;
- ``tpenv``: ``PodTunnel.open_stream`` (kits/portforward.py over kits/ws_client.py),

reading the StreamReader 256 KiB at a time (splice's chunk) until EOF. Each row: MB/s and the
client's CPU seconds (process time) for the download; rounds alternate the two clients so both
see the same machine. Only 127.0.0.1 is used. Timing is reported, never asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))

SUBPROTOCOL = "v4.channel.k8s.io"
SERVER_NAME = "tpenv-manager.bench.svc"
CHUNK = 256 * 1024


async def serve(args: argparse.Namespace) -> None:
    from websockets.asyncio.server import serve as ws_serve

    payload = os.urandom(args.frame - 1)
    frames = args.mib * 1024 * 1024 // len(payload)

    msg = b"\x00" + payload
    head = struct.pack("!BBH", 0x82, 126, len(msg)) if len(msg) < 65536 else struct.pack("!BBQ", 0x82, 127, len(msg))
    per_block = max(1, (1 << 20) // len(msg))
    block = (head + msg) * per_block  # pre-framed: the server's CPU stays off the client's figure

    async def handle(ws) -> None:
        port = struct.pack("<H", 80)
        await ws.send(b"\x00" + port)
        await ws.send(b"\x01" + port)
        left = frames
        while left >= per_block:
            ws.transport.write(block)  # the frames' bytes, under websockets' connection (same wire)
            left -= per_block
            await ws.drain()  # websockets' own wait on the transport's pause/resume
        for _ in range(left):
            await ws.send(msg)
        await ws.close()

    ctx = None
    if args.certs:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(args.certs, "tls.crt"), os.path.join(args.certs, "tls.key"))
    async with ws_serve(handle, "127.0.0.1", 0, subprotocols=[SUBPROTOCOL], compression=None, ssl=ctx,
                        max_size=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()


class FakeKube:
    """What PodTunnel needs of a Kube: host, headers, TLS."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None) -> None:
        self.host = f"{'https' if ctx else 'http'}://127.0.0.1:{port}"
        self._ctx = ctx
        self.proxy = None
        self.tls_server_name = SERVER_NAME if ctx else None

    def auth_headers(self) -> dict[str, str]:
        return {}

    def ssl_context(self) -> ssl.SSLContext | None:
        return self._ctx


async def drain(reader: asyncio.StreamReader) -> int:
    n = 0
    while data := await reader.read(CHUNK):
        n += len(data)
    return n


async def library_client(port: int, ctx: ssl.SSLContext | None) -> int:
    import websockets
    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=CHUNK, loop=loop)
    scheme = "wss" if ctx else "ws"
    kw = {"ssl": ctx, "server_hostname": SERVER_NAME} if ctx else {}
    ws = await connect(f"{scheme}://127.0.0.1:{port}/x?ports=80", subprotocols=[SUBPROTOCOL], compression=None,
                       max_size=None, max_queue=64, **kw)
    seen = set()

    async def read_loop() -> None:
        try:
            while True:
                msg = await ws.recv()
                channel, data = msg[0], msg[1:]
                if channel not in seen:
                    seen.add(channel)
                    data = data[2:]
                if channel == 0 and data:
                    reader.feed_data(data)
        except websockets.ConnectionClosedOK:
            reader.feed_eof()

    task = asyncio.ensure_future(read_loop())
    n = await drain(reader)
    await task
    await ws.close()
    return n


async def tpenv_client(port: int, ctx: ssl.SSLContext | None) -> int:
    from tpenv.kits.portforward import PodTunnel

    tunnel = PodTunnel(FakeKube(port, ctx), "bench", "pod", protocol="websocket")
    reader, writer = await tunnel.open_stream(80, limit=CHUNK)
    n = await drain(reader)
    writer.close()
    await tunnel.wait_closed()
    return n


async def measure(args: argparse.Namespace) -> list[dict]:
    certs = None
    ctx = None
    tmp = tempfile.TemporaryDirectory()
    if not args.plain:
        from tpenv_agent import tlscert

        tls = tlscert.generate("bench")
        for k, v in tls.items():
            Path(tmp.name, k).write_bytes(v)
        certs = tmp.name
        ctx = ssl.create_default_context(cafile=os.path.join(tmp.name, "ca.crt"))
    cmd = [sys.executable, __file__, "--serve", "--mib", str(args.mib), "--frame", str(args.frame)]
    server = subprocess.Popen(cmd + (["--certs", certs] if certs else []), stdout=subprocess.PIPE)
    rows = []
    try:
        port = int(server.stdout.readline())
        for r in range(args.rounds):
            for name, client in (("library", library_client), ("tpenv", tpenv_client)):
                cpu, wall = time.process_time(), time.perf_counter()
                n = await client(port, ctx)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                rows.append({"client": name, "round": r, "bytes": n, "mb_s": n / wall / 1e6, "cpu_s": cpu,
                             "wall_s": wall})
                print(f"{name:8} round {r}: {n / 2**20:.0f} MiB  {n / wall / 1e6:7.1f} MB/s  "
                      f"client CPU {cpu:.2f} s  wall {wall:.2f} s", flush=True)
    finally:
        server.terminate()
        server.wait()
        tmp.cleanup()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--frame", type=int, default=29 * 1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--plain", action="store_true", help="no TLS")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--certs", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args))
        return
    rows = asyncio.run(measure(args))
    for name in ("library", "tpenv"):
        mine = [r for r in rows if r["client"] == name]
        print(f"{name:8} best {max(r['mb_s'] for r in mine):7.1f} MB/s, least CPU {min(r['cpu_s'] for r in mine):.2f} s")
    lib = [r for r in rows if r["client"] == "library"]
    new = [r for r in rows if r["client"] == "tpenv"]
    print(f"tpenv / library, per round: MB/s {[round(b['mb_s'] / a['mb_s'], 2) for a, b in zip(lib, new)]}, "
          f"CPU {[round(b['cpu_s'] / a['cpu_s'], 2) for a, b in zip(lib, new)]}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
