#!/usr/bin/env python3
"""tpenv-echo: the test workload. Answers every request with what it saw, as one JSON object.

    {"pod": HOSTNAME, "source": "cluster", "proto": "HTTP/1.1"|"HTTP/2"|"gRPC",
     "method": ..., "path": ..., "headers": {lower-case name: value}, "body_length": n}

One port ($PORT, default 8080) speaks HTTP/1.1 with keep-alive and HTTP/2 with
prior knowledge (h2c, as gRPC uses in a cluster): a request whose content-type
is application/grpc gets the same JSON as a gRPC message with grpc-status 0,
so any unary method works with raw-bytes serializers.

Query parameters help tests: `sleep=SECONDS` delays the answer, `status=CODE`
sets the HTTP status. Standard library only, plus `h2` for HTTP/2.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from urllib.parse import parse_qs, urlsplit

H2_PREFACE_LINE = b"PRI * HTTP/2.0\r\n"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
POD = os.environ.get("HOSTNAME") or socket.gethostname()
QUIET = False


def log(msg: str) -> None:
    if not QUIET:
        print(f"tpenv-echo: {msg}", flush=True)


def answer(proto: str, method: str, path: str, headers: dict[str, str], body_length: int) -> dict:
    return {
        "pod": POD,
        "source": "cluster",
        "proto": proto,
        "method": method,
        "path": path,
        "headers": headers,
        "body_length": body_length,
    }


def knobs(path: str) -> tuple[float, int]:
    q = parse_qs(urlsplit(path).query)
    try:
        sleep = float(q.get("sleep", ["0"])[0])
        status = int(q.get("status", ["200"])[0])
    except ValueError:
        return 0.0, 400
    return min(sleep, 300.0), status


# --- HTTP/1.1 ---------------------------------------------------------------------------


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> int:
    """Read (and count) the request body: Content-Length or chunked."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while True:
            size = int((await reader.readuntil(b"\n")).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readuntil(b"\n")).strip():  # trailers
                    pass
                return total
            await reader.readexactly(size + 2)
            total += size
    n = int(headers.get("content-length", "0") or 0)
    if n:
        await reader.readexactly(n)
    return n


async def serve_http1(first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = first
    while line:
        parts = line.decode("latin-1").split()
        if len(parts) != 3:
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        method, path, version = parts
        headers: dict[str, str] = {}
        while True:
            h = await reader.readuntil(b"\n")
            if h in (b"\r\n", b"\n"):
                break
            name, _, value = h.decode("latin-1").partition(":")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body_length = await read_body(reader, headers)
        sleep, status = knobs(path)
        if sleep:
            await asyncio.sleep(sleep)
        conn = headers.get("connection", "").lower()
        keep = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn
        body = json.dumps(answer("HTTP/1.1", method, path, headers, body_length)).encode() + b"\n"
        writer.write(
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Echo'}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Echo-Pod: {POD}\r\n{'' if keep else 'Connection: close' + chr(13) + chr(10)}\r\n".encode()
            + (b"" if method == "HEAD" else body)
        )
        await writer.drain()
        log(f"{method} {path} HTTP/1.1 {status}")
        if not keep:
            return
        line = await reader.readline()


# --- HTTP/2 and gRPC -------------------------------------------------------------------


async def serve_h2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.receive_data(H2_PREFACE)
    writer.write(conn.data_to_send())
    streams: dict[int, dict] = {}
    pending: dict[int, tuple[bytes, list | None]] = {}  # data waiting for flow-control window, trailers

    def flush(sid: int) -> None:
        data, trailers = pending[sid]
        while data:
            n = min(len(data), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if n <= 0:
                pending[sid] = (data, trailers)
                return
            conn.send_data(sid, data[:n], end_stream=(len(data) == n and trailers is None))
            data = data[n:]
        if trailers is not None:
            conn.send_headers(sid, trailers, end_stream=True)
        del pending[sid]

    async def respond(sid: int, req: dict) -> None:
        try:
            await answer_stream(sid, req)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError, ConnectionError):
            pass  # the caller reset the stream or went away while we slept

    async def answer_stream(sid: int, req: dict) -> None:
        h = req["headers"]
        method, path = h.pop(":method", "GET"), h.pop(":path", "/")
        if ":authority" in h:
            h.setdefault("host", h[":authority"])
        h = {k: v for k, v in h.items() if not k.startswith(":")}
        grpc = h.get("content-type", "").startswith("application/grpc")
        sleep, status = knobs(path)
        if sleep:
            await asyncio.sleep(sleep)
        if sid not in conn.streams or conn.streams[sid].closed:
            return
        body = json.dumps(answer("gRPC" if grpc else "HTTP/2", method, path, h, req["body_length"])).encode()
        if grpc:
            conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            pending[sid] = (b"\0" + len(body).to_bytes(4, "big") + body, [("grpc-status", "0")])
        else:
            body += b"\n"
            conn.send_headers(
                sid,
                [(":status", str(status)), ("content-type", "application/json"), ("content-length", str(len(body))), ("x-echo-pod", POD)],
            )
            pending[sid] = (body, None)
        flush(sid)
        writer.write(conn.data_to_send())
        log(f"{method} {path} {'gRPC' if grpc else 'HTTP/2'} {status}")

    tasks = set()
    while True:
        data = await reader.read(65536)
        if not data:
            return
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                streams[ev.stream_id] = {"headers": {}, "body_length": 0}
                for k, v in ev.headers:
                    hs = streams[ev.stream_id]["headers"]
                    hs[k] = f"{hs[k]}, {v}" if k in hs else v
            elif isinstance(ev, h2.events.DataReceived):
                if ev.stream_id in streams:
                    streams[ev.stream_id]["body_length"] += len(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in streams:
                t = asyncio.ensure_future(respond(ev.stream_id, streams.pop(ev.stream_id)))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            elif isinstance(ev, h2.events.StreamReset):
                streams.pop(ev.stream_id, None)
                pending.pop(ev.stream_id, None)
            elif isinstance(ev, h2.events.WindowUpdated):
                for sid in list(pending):
                    flush(sid)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                writer.write(conn.data_to_send())
                return
        writer.write(conn.data_to_send())
        await writer.drain()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        first = await reader.readline()
        if first == H2_PREFACE_LINE:
            rest = await reader.readexactly(len(H2_PREFACE) - len(first))
            if first + rest == H2_PREFACE:
                await serve_h2(reader, writer)
        elif first:
            await serve_http1(first, reader, writer)
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    except ImportError:
        log("HTTP/2 needs the h2 package; connection closed")
    finally:
        writer.close()


async def amain(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port, reuse_address=True)
    log(f"listening on {host}:{port} as pod {POD} (HTTP/1.1, h2c, gRPC)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # As PID 1 in a container, SIGTERM is ignored unless handled: handle it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    log("stopped")


def main(argv: list[str] | None = None) -> int:
    global QUIET
    p = argparse.ArgumentParser(prog="tpenv-echo", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")), help="port ($PORT, default 8080)")
    p.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"), help="address to bind (default 0.0.0.0)")
    p.add_argument("--quiet", action="store_true", default=bool(os.environ.get("ECHO_QUIET")), help="no per-request log")
    args = p.parse_args(argv)
    QUIET = args.quiet
    asyncio.run(amain(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
