#!/usr/bin/env python3
"""tpenv-get: a client for tests run from in-cluster pods. One JSON line per answer.

    tpenv-get URL [-H 'name: value']... [-n N] [--interval S] [--http2 | --grpc]

Makes N requests over ONE connection (HTTP/1.1 keep-alive, one HTTP/2
connection with a stream each, or one gRPC channel), so a test can see an
agent route requests of the same connection differently. Each answer prints as
the server's JSON object plus "status" (HTTP status, or the gRPC code name);
a failure prints {"error": ...}, the next request reconnects, and the exit
status is 1 if any request failed.
"""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from urllib.parse import urlsplit


def line(obj: dict) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


def parse_answer(status, body: bytes) -> dict:
    try:
        obj = json.loads(body)
        if not isinstance(obj, dict):
            obj = {"body": obj}
    except ValueError:
        obj = {"body": body.decode("utf-8", "replace")}
    obj["status"] = status
    return obj


def run_http1(url, headers, n, interval, method, data, timeout) -> int:
    u = urlsplit(url)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    conn, failed = None, 0
    for i in range(n):
        try:
            if conn is None:
                conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
            conn.request(method, target, body=data, headers=headers)
            r = conn.getresponse()
            line(parse_answer(r.status, r.read()))
        except (OSError, http.client.HTTPException) as e:
            failed += 1
            line({"error": f"{type(e).__name__}: {e}", "request": i})
            if conn is not None:
                conn.close()
            conn = None
        if interval and i < n - 1:
            time.sleep(interval)
    return 1 if failed else 0


def run_h2(url, headers, n, interval, method, data, timeout) -> int:
    import h2.config
    import h2.connection
    import h2.events

    u = urlsplit(url)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    sock, conn, failed = None, None, 0
    for i in range(n):
        try:
            if sock is None:
                sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
                conn.initiate_connection()
                sock.sendall(conn.data_to_send())
            sid = conn.get_next_available_stream_id()
            hdrs = [(":method", method), (":scheme", "http"), (":authority", u.netloc), (":path", target)]
            hdrs += [(k.lower(), v) for k, v in headers.items()]
            conn.send_headers(sid, hdrs, end_stream=not data)
            if data:
                conn.send_data(sid, data, end_stream=True)
            sock.sendall(conn.data_to_send())
            status, body, done = None, b"", False
            while not done:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed by the server")
                for ev in conn.receive_data(chunk):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        status = int(dict(ev.headers)[":status"])
                    elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                        body += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                        done = True
                    elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                        raise ConnectionError(f"stream reset, code {ev.error_code}")
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        raise ConnectionError("GOAWAY from the server")
                sock.sendall(conn.data_to_send())
            line(parse_answer(status, body))
        except (OSError, ValueError) as e:
            failed += 1
            line({"error": f"{type(e).__name__}: {e}", "request": i})
            if sock is not None:
                sock.close()
            sock = None
        if interval and i < n - 1:
            time.sleep(interval)
    return 1 if failed else 0


def run_grpc(url, headers, n, interval, method, data, timeout) -> int:
    import grpc

    u = urlsplit(url)
    # Any unary method works against tpenv-echo; the path picks the method name.
    rpc = u.path if u.path and u.path != "/" else "/tpenv.Echo/Echo"
    channel = grpc.insecure_channel(f"{u.hostname}:{u.port or 80}")
    call = channel.unary_unary(rpc, request_serializer=None, response_deserializer=None)
    metadata = [(k.lower(), v) for k, v in headers.items()]
    failed = 0
    for i in range(n):
        try:
            resp = call(data or b"", metadata=metadata, timeout=timeout)
            line(parse_answer("OK", resp))
        except grpc.RpcError as e:
            failed += 1
            line({"error": f"{e.code().name}: {e.details()}", "request": i})
        if interval and i < n - 1:
            time.sleep(interval)
    channel.close()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tpenv-get", description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("-H", "--header", action="append", default=[], help="'name: value' (repeatable)")
    p.add_argument("-n", type=int, default=1, help="number of requests on the one connection")
    p.add_argument("-X", "--method", default="GET")
    p.add_argument("-d", "--data", default=None, help="request body")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between requests")
    p.add_argument("--timeout", type=float, default=10.0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--http2", action="store_true", help="HTTP/2 with prior knowledge (h2c)")
    g.add_argument("--grpc", action="store_true", help="unary gRPC call with raw bytes; URL path = method")
    args = p.parse_args(argv)
    headers = {}
    for h in args.header:
        k, sep, v = h.partition(":")
        if not sep:
            k, sep, v = h.partition("=")
        if not sep:
            p.error(f"bad header {h!r}: want 'name: value'")
        headers[k.strip()] = v.strip()
    data = args.data.encode() if args.data is not None else None
    run = run_grpc if args.grpc else run_h2 if args.http2 else run_http1
    return run(args.url, headers, args.n, args.interval, args.method, data, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
