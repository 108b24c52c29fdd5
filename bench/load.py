#!/usr/bin/env python3
"""The bench's load generator: runs tasks, prints one JSON line per task.

Standard library only (gRPC tasks need ``grpcio``, present in the tpenv/testapp image), so the
same file runs on the host (loopback, port-forward) and inside a client pod, fed on stdin:

    kubectl exec -i client -- python3 - '<json list of tasks>' < bench/load.py
    python3 bench/load.py '<json list of tasks>'

Task kinds (every task has "kind", "label", "host", "port"):

    latency  one keep-alive connection, "n" requests of "size" bytes at a fixed "rate" (req/s),
             optional "headers"; then, if "idle" > 0, one more request after that many seconds idle
    conc     "conns" keep-alive connections sharing a fixed total "rate" for "seconds": errors, p99
    rps      "conns" connections, closed loop (next request when the answer is in) for "seconds"
    wrk      the same closed loop driven by wrk (C, in the tpenv/testapp image): "conns" connections
             on "threads" threads for "seconds" (whole seconds), GET /?size="size"
    bulk     one transfer of "bytes": "dir" down (GET, the server sends) or up (POST, we send)
    hol      "latency" on one connection while another keeps downloading "bytes" per request
    grpc     one gRPC channel, "n" unary calls at "rate", optional "headers" (metadata)
    routed   until one GET on a fresh connection is answered (200) with X-Bench-Hop "hop" (and,
             given, X-Bench-Side "side"), for at most "seconds": after a rollout, the Service can
             refuse or reach the old pod for a while (kube-proxy programs the node after the
             EndpointSlice update); "failed" with the last answer when the bound passes

"rps" and "wrk" report "cpu_s": the CPU the load generator spent (this process for rps, the wrk
child for wrk), so the bench can say how much of the machine the client itself took.

Latency is the time from writing a request to its last response byte (service time; requests
are paced at the fixed rate, and a slow answer delays the next one rather than queueing it).
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Callable

BLOCK = os.urandom(1 << 20)
TIMEOUT = 30.0


def pct(samples: list[float], p: float) -> float | None:
    if not samples:
        return None
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def summary(lat: list[float]) -> dict:
    ms = [x * 1e3 for x in lat]
    return {"p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99),
            "max_ms": max(ms) if ms else None, "mean_ms": sum(ms) / len(ms) if ms else None}


class Conn:
    def __init__(self, host: str, port: int, headers: dict | None = None) -> None:
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sides: dict[str, int] = {}  # X-Bench-Side of the answers: "cluster" (the app) or "laptop"
        self.hops: dict[str, int] = {}  # X-Bench-Hop: "direct" (from the caller) or "proxy" (from loopback)

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str = "GET", path: str = "/", body: int = 0, sink: list | None = None) -> int:
        """One request; returns the number of body bytes received (status must be 200)."""
        if self.writer is None:
            await self.open()
        w, r = self.writer, self.reader
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n").encode() + self.extra
        if method == "POST":
            head += b"Content-Length: %d\r\n" % body
        w.write(head + b"\r\n")
        left = body
        while left > 0:
            n = min(left, len(BLOCK))
            w.write(BLOCK if n == len(BLOCK) else BLOCK[:n])
            left -= n
            await w.drain()
        resp = await r.readuntil(b"\r\n\r\n")
        status = int(resp[9:12])
        length = None
        for line in resp.split(b"\r\n")[1:]:
            low = line[:15].lower()
            if low == b"content-length:":
                length = int(line[15:])
            elif low == b"x-bench-side: c" or low == b"x-bench-side: l" or low == b"x-bench-side: h":
                side = line[13:].strip().decode()
                self.sides[side] = self.sides.get(side, 0) + 1
            elif low[:13] == b"x-bench-hop: ":
                hop = line[13:].strip().decode()
                self.hops[hop] = self.hops.get(hop, 0) + 1
        if length is None:
            raise ConnectionError(f"answer without Content-Length (status {status})")
        got = 0
        while got < length:
            chunk = await r.read(min(length - got, 1 << 20))
            if not chunk:
                raise ConnectionError(f"connection closed after {got} of {length} body bytes")
            got += len(chunk)
            if sink is not None:
                sink.append((time.perf_counter(), got))
        if status != 200:
            raise ConnectionError(f"status {status}")
        return got


async def paced(conn: Conn, n: int | None, rate: float, size: int, until: float | None, lat: list, errs: list,
                phase: float = 0.0, stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate if rate > 0 else 0.0
    nxt = loop.time() + phase
    i = 0
    path = f"/?size={size}"
    while (n is None or i < n) and (until is None or time.perf_counter() < until) and not (stop and stop.is_set()):
        delay = nxt - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        nxt += interval
        i += 1
        t = time.perf_counter()
        try:
            async with asyncio.timeout(TIMEOUT):
                await conn.request("GET", path)
            lat.append(time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - counted and reported
            errs.append(f"{type(e).__name__}: {e}"[:200])
            conn.close()


async def t_latency(t: dict) -> dict:
    conn = Conn(t["host"], t["port"], t.get("headers"))
    lat: list[float] = []
    errs: list[str] = []
    await conn.request("GET", "/?size=1")  # connect and warm up outside the samples
    t0 = time.perf_counter()
    await paced(conn, t["n"], t["rate"], t.get("size", 1024), None, lat, errs)
    took = time.perf_counter() - t0
    out = {"n": len(lat) + len(errs), "errors": len(errs), "error_samples": errs[:3], **summary(lat),
           "rate_target": t["rate"], "rps": (len(lat) + len(errs)) / took}
    if t.get("raw"):
        out["samples_ms"] = [round(x * 1e3, 4) for x in lat]
    if t.get("idle"):
        await asyncio.sleep(t["idle"])
        s = time.perf_counter()
        try:
            await conn.request("GET", f"/?size={t.get('size', 1024)}")
            out["idle_ms"] = (time.perf_counter() - s) * 1e3
        except Exception as e:  # noqa: BLE001
            out["idle_ms"] = None
            out["idle_error"] = str(e)
    out["answered_by"], out["hops"] = conn.sides, conn.hops
    conn.close()
    return out


async def t_conc(t: dict) -> dict:
    conns = [Conn(t["host"], t["port"], t.get("headers")) for _ in range(t["conns"])]
    connect_errs: list[str] = []

    async def opener(c: Conn) -> None:
        try:
            async with asyncio.timeout(TIMEOUT):
                await c.request("GET", "/?size=1")
        except Exception as e:  # noqa: BLE001
            connect_errs.append(f"{type(e).__name__}: {e}"[:200])
            c.close()

    await asyncio.gather(*(opener(c) for c in conns))
    lat: list[float] = []
    errs: list[str] = []
    per = t["rate"] / len(conns)
    t0 = time.perf_counter()
    until = t0 + t["seconds"]
    await asyncio.gather(*(paced(c, None, per, t.get("size", 1024), until, lat, errs, phase=i / t["rate"])
                           for i, c in enumerate(conns)))
    took = time.perf_counter() - t0
    sides: dict[str, int] = {}
    hops: dict[str, int] = {}
    for c in conns:
        c.close()
        for k, v in c.sides.items():
            sides[k] = sides.get(k, 0) + v
        for k, v in c.hops.items():
            hops[k] = hops.get(k, 0) + v
    return {"answered_by": sides, "hops": hops, "conns": len(conns), "seconds": t["seconds"], "rate_target": t["rate"], "requests": len(lat),
            "errors": len(errs) + len(connect_errs), "connect_errors": len(connect_errs),
            "error_samples": (connect_errs + errs)[:5], "rps": len(lat) / took, **summary(lat)}


async def t_rps(t: dict) -> dict:
    lat: list[float] = []
    errs: list[str] = []
    until = time.perf_counter() + t["seconds"]
    path = f"/?size={t.get('size', 1024)}"

    async def worker() -> None:
        c = Conn(t["host"], t["port"], t.get("headers"))
        while time.perf_counter() < until:
            s = time.perf_counter()
            try:
                async with asyncio.timeout(TIMEOUT):
                    await c.request("GET", path)
                lat.append(time.perf_counter() - s)
            except Exception as e:  # noqa: BLE001
                errs.append(str(e)[:200])
                c.close()
        c.close()

    t0 = time.perf_counter()
    c0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(t["conns"])))
    took = time.perf_counter() - t0
    return {"conns": t["conns"], "requests": len(lat), "errors": len(errs), "error_samples": errs[:3],
            "rps": len(lat) / took, "seconds": took, "cpu_s": time.process_time() - c0, **summary(lat)}


# wrk's done() hook: the figures as one JSON line (latencies in microseconds), no text to parse.
WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "mean_us": %.1f}\n', summary.requests, summary.duration, summary.bytes, e.connect, e.read,
    e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


async def t_wrk(t: dict) -> dict:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed here (an older tpenv/testapp image? python3 tests/cluster/images.py import)")
    seconds = max(1, round(t["seconds"]))
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
        f.write(WRK_LUA)
        f.flush()
        # "writes": 2 asks bench/server.py for its headers and body in two writes (answer_parts).
        url = f"http://{t['host']}:{t['port']}/?size={t.get('size', 1024)}"
        if t.get("writes") == 2:
            url += "&writes=2"
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = await asyncio.create_subprocess_exec(
            wrk, f"-t{t.get('threads', 1)}", f"-c{t['conns']}", f"-d{seconds}s", "--timeout", f"{int(TIMEOUT)}s",
            "-s", f.name, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk exited {proc.returncode}: {(err or out).decode().strip()[-300:]}")
    r = json.loads(line[len("WRKJSON "):])
    took = r["duration_us"] / 1e6
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return {"conns": t["conns"], "threads": t.get("threads", 1), "requests": r["requests"], "errors": errors,
            "error_kinds": {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]},
            "rps": r["requests"] / took, "seconds": took, "MBps_read": r["bytes"] / took / 1e6,
            "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
            "p50_ms": r["p50_us"] / 1e3, "p90_ms": r["p90_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3,
            "max_ms": r["max_us"] / 1e3, "mean_ms": r["mean_us"] / 1e3}


async def t_bulk(t: dict) -> dict:
    c = Conn(t["host"], t["port"], t.get("headers"))
    await c.request("GET", "/?size=1")
    s = time.perf_counter()
    async with asyncio.timeout(t.get("timeout", 600)):
        if t["dir"] == "down":
            got = await c.request("GET", f"/?size={t['bytes']}")
            assert got == t["bytes"], (got, t["bytes"])
        else:
            await c.request("POST", "/", body=t["bytes"])
    took = time.perf_counter() - s
    c.close()
    return {"answered_by": c.sides, "hops": c.hops, "bytes": t["bytes"], "dir": t["dir"], "seconds": took, "MBps": t["bytes"] / took / 1e6}


async def bulk_gets(c: Conn, size: int, moved: list[int], errs: list[str], go_on: Callable[[], bool]) -> None:
    """GETs of ``size`` back to back on ``c`` while ``go_on()``: the bytes added to ``moved[0]``, a
    failure kept in ``errs`` and the connection reopened by the next request (the bulk of ``t_hol``
    and ``t_bulkloop``)."""
    while go_on():
        try:
            moved[0] += await c.request("GET", f"/?size={size}")
        except Exception as e:  # noqa: BLE001
            errs.append(str(e)[:200])
            c.close()
            await asyncio.sleep(0.1)
    c.close()


async def t_bulkloop(t: dict) -> dict:
    """GETs of ``bytes`` back to back for ``seconds``: the bulk of bench/hol_cross.py, which puts the
    small requests on another path (or in another place) than this transfer."""
    c = Conn(t["host"], t["port"], t.get("headers"))
    moved, errs, s = [0], [], time.perf_counter()
    await bulk_gets(c, t["bytes"], moved, errs, lambda: time.perf_counter() - s < t["seconds"])
    took = time.perf_counter() - s
    return {"bytes": moved[0], "seconds": took, "MBps": moved[0] / took / 1e6, "errors": len(errs),
            "error_samples": errs[:3], "answered_by": c.sides}


async def t_hol(t: dict) -> dict:
    stop = asyncio.Event()
    moved = [0]
    bulk_errs: list[str] = []

    b = asyncio.ensure_future(bulk_gets(Conn(t["host"], t["port"], t.get("headers")), t["bytes"], moved, bulk_errs,
                                        lambda: not stop.is_set()))
    await asyncio.sleep(t.get("lead", 0.5))  # the transfer is under way before we sample
    conn = Conn(t["host"], t["port"], t.get("headers"))
    lat: list[float] = []
    errs: list[str] = []
    t0 = time.perf_counter()
    m0 = moved[0]
    await paced(conn, t["n"], t["rate"], t.get("size", 1024), None, lat, errs)
    took = time.perf_counter() - t0
    stop.set()
    conn.close()
    b.cancel()
    try:
        await b
    except BaseException:  # noqa: BLE001
        pass
    return {"n": len(lat) + len(errs), "errors": len(errs), "error_samples": errs[:3], **summary(lat),
            "answered_by": conn.sides, "bulk_MBps_during": (moved[0] - m0) / took / 1e6, "bulk_errors": len(bulk_errs)}


async def t_grpc(t: dict) -> dict:
    import grpc  # in the testapp image
    import grpc.aio

    async with grpc.aio.insecure_channel(f"{t['host']}:{t['port']}") as ch:
        call = ch.unary_unary("/tpenv.Bench/Echo", request_serializer=None, response_deserializer=None)
        md = [(k.lower(), v) for k, v in (t.get("headers") or {}).items()]
        await call(b"warm", metadata=md, timeout=TIMEOUT)
        loop = asyncio.get_running_loop()
        interval = 1.0 / t["rate"]
        nxt = loop.time()
        lat: list[float] = []
        errs: list[str] = []
        sources: dict[str, int] = {}
        for _ in range(t["n"]):
            d = nxt - loop.time()
            if d > 0:
                await asyncio.sleep(d)
            nxt += interval
            s = time.perf_counter()
            try:
                resp = await call(b"x" * t.get("size", 16), metadata=md, timeout=TIMEOUT)
                lat.append(time.perf_counter() - s)
                try:
                    src = json.loads(resp).get("pod", "?")
                except ValueError:
                    src = "?"
                sources[src] = sources.get(src, 0) + 1
            except grpc.RpcError as e:
                errs.append(f"{e.code().name}: {e.details()}"[:200])
    return {"n": len(lat) + len(errs), "errors": len(errs), "error_samples": errs[:3], "answered_by": sources,
            **summary(lat)}


async def t_routed(t: dict) -> dict:
    # Retried on a short fixed pause: from a client there is no event for "kube-proxy now routes
    # here", only answers; bounded by "seconds", and each attempt's outcome is kept for the reason.
    t0 = time.perf_counter()
    attempts, last = 0, "no attempt"
    while True:
        attempts += 1
        conn = Conn(t["host"], t["port"])
        try:
            async with asyncio.timeout(5):
                await conn.request("GET", "/?size=1")
            hop, side = next(iter(conn.hops), None), next(iter(conn.sides), None)
            if hop == t["hop"] and (t.get("side") is None or side == t["side"]):
                return {"attempts": attempts, "seconds": time.perf_counter() - t0}
            last = f"answered via hop {hop!r} by {side!r}"
        except Exception as e:  # noqa: BLE001 - refused, reset, timed out: the Service is not routed yet
            last = f"{type(e).__name__}: {e}"[:200]
        finally:
            conn.close()
        if time.perf_counter() - t0 > t["seconds"]:
            return {"failed": f"{t['host']}:{t['port']} not answered via hop {t['hop']!r} within "
                              f"{t['seconds']:.0f}s ({attempts} attempts; last: {last})"}
        await asyncio.sleep(0.2)


KINDS = {"latency": t_latency, "conc": t_conc, "rps": t_rps, "wrk": t_wrk, "bulk": t_bulk, "bulkloop": t_bulkloop,
         "hol": t_hol, "grpc": t_grpc, "routed": t_routed}


async def amain(tasks: list[dict]) -> None:
    for t in tasks:
        s = time.perf_counter()
        try:
            res = await KINDS[t["kind"]](t)
        except Exception as e:  # noqa: BLE001 - the task's failure is its result
            res = {"failed": f"{type(e).__name__}: {e}"[:300]}
        res.update(label=t.get("label", t["kind"]), kind=t["kind"], wall_s=time.perf_counter() - s)
        print(json.dumps(res), flush=True)


def main() -> None:
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    except (ImportError, ValueError, OSError):
        pass
    tasks = json.loads(sys.argv[1])
    asyncio.run(amain(tasks))


if __name__ == "__main__":
    main()
