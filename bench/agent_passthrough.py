"""Passthrough cost of the traffic agent, measured locally in one run.

The same requests go to the app directly and through the sidecar (no intercept: the raw
splice path), interleaved in rounds so background load hits both alike:

- latency: sequential requests on one keep-alive connection (p50, p99), and on a fresh
  connection each (connect + request);
- throughput: C concurrent keep-alive connections for T seconds (requests/s), and bulk
  transfer of a large chunked response (MB/s).

The app and the sidecar each run as their own process (the app is the test helper's
asyncio HTTP server), the load generator is this process. Run:

    .venv/bin/python bench/agent_passthrough.py [--requests 2000] [--seconds 3] [--concurrency 16]
    .venv/bin/python bench/agent_passthrough.py --compare-loops     (agent CPU per request, uvloop vs asyncio)

Prints a table, then one JSON line with every figure. ``--loop`` picks the sidecar's event loop
(TPENV_AGENT_LOOP, default auto: uvloop when installed); ``--compare-loops`` runs one agent per loop
on the same app and alternates closed-loop rounds between them.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "agent" / "tests"))
from agent_testkit import H2Caller, Http1, auth_material, run_agent  # noqa: E402
from agent_local import keepalive_latencies, pct  # noqa: E402

APP = r"""
import asyncio, sys
sys.path.insert(0, %r)
from agent_testkit import App
async def main():
    async with App("app") as app:
        print(app.port, flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
""" % str(REPO / "agent" / "tests")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def fresh_latencies(port: int, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        async with Http1(port) as c:
            status, _, _ = await c.request("/bench")
        out.append(time.perf_counter() - t)
        assert status == 200
    return out


async def throughput(port: int, seconds: float, concurrency: int) -> float:
    stop = time.perf_counter() + seconds
    counts = [0] * concurrency

    async def worker(i: int) -> None:
        async with Http1(port) as c:
            while time.perf_counter() < stop:
                status, _, _ = await c.request("/bench")
                assert status == 200
                counts[i] += 1

    t = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return sum(counts) / (time.perf_counter() - t)


async def h2_latencies(port: int, n: int) -> list[float]:
    out = []
    async with H2Caller(port) as c:
        for _ in range(n):
            t = time.perf_counter()
            r = await c.request("/pkg.Svc/Call", grpc=True, body=b"\0\0\0\0\0")
            out.append(time.perf_counter() - t)
            assert r["trailers"].get("grpc-status") == "0"
    return out


async def h2_throughput(port: int, seconds: float, concurrency: int) -> float:
    """Concurrent gRPC-like calls multiplexed on one h2c connection."""
    stop = time.perf_counter() + seconds
    count = 0
    async with H2Caller(port) as c:
        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < stop:
                await c.request("/pkg.Svc/Call", grpc=True, body=b"\0\0\0\0\0")
                count += 1
        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - t)


async def bulk(port: int, size: int) -> float:
    async with Http1(port) as c:
        t = time.perf_counter()
        _, _, body = await c.request(f"/big?n={size}")
        assert len(body) == size
        return size / (time.perf_counter() - t) / 1e6


async def run(args: argparse.Namespace) -> dict:
    app = await asyncio.create_subprocess_exec(sys.executable, "-c", APP, stdout=asyncio.subprocess.PIPE)
    app_port = int(await app.stdout.readline())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with run_agent(Path(tmp), auth_material(), [f"0:{app_port}:http"],
                                 extra=args.agent_arg, env={"TPENV_AGENT_LOOP": args.loop}) as agent:
                targets = {"direct": app_port, "agent": agent.port("http")}
                lat = {k: [] for k in targets}
                fresh = {k: [] for k in targets}
                rps = {k: [] for k in targets}
                agent_cpu, agent_reqs = 0.0, 0
                mbs = {k: [] for k in targets}
                h2lat = {k: [] for k in targets}
                h2rps = {k: [] for k in targets}
                for k, p in targets.items():  # warm up both paths
                    await keepalive_latencies(p, 100)
                rounds = args.rounds
                for _ in range(rounds):
                    for k, p in targets.items():
                        lat[k] += await keepalive_latencies(p, args.requests // rounds)
                        fresh[k] += await fresh_latencies(p, args.requests // rounds // 4)
                        c0 = cpu_seconds(agent.proc.pid)
                        t0 = time.perf_counter()
                        rps[k].append(await throughput(p, args.seconds / rounds, args.concurrency))
                        if k == "agent":
                            agent_cpu += cpu_seconds(agent.proc.pid) - c0
                            agent_reqs += int(rps[k][-1] * (time.perf_counter() - t0))
                        mbs[k].append(await bulk(p, args.bulk_mb * 1_000_000))
                        h2lat[k] += await h2_latencies(p, args.requests // rounds // 2)
                        h2rps[k].append(await h2_throughput(p, args.seconds / rounds, args.concurrency))
    finally:
        app.kill()
        await app.wait()
    res: dict = {"requests": args.requests, "concurrency": args.concurrency, "seconds": args.seconds}
    for k in ("direct", "agent"):
        res[k] = {
            "keepalive_p50_ms": pct(lat[k], 50) * 1e3, "keepalive_p99_ms": pct(lat[k], 99) * 1e3,
            "fresh_p50_ms": pct(fresh[k], 50) * 1e3, "fresh_p99_ms": pct(fresh[k], 99) * 1e3,
            "rps": statistics.fmean(rps[k]), "bulk_MBps": statistics.fmean(mbs[k]),
            "h2_p50_ms": pct(h2lat[k], 50) * 1e3, "h2_p99_ms": pct(h2lat[k], 99) * 1e3,
            "h2_rps": statistics.fmean(h2rps[k]),
        }
    d, a = res["direct"], res["agent"]
    res["added_p50_ms"] = a["keepalive_p50_ms"] - d["keepalive_p50_ms"]
    res["added_p99_ms"] = a["keepalive_p99_ms"] - d["keepalive_p99_ms"]
    res["added_fresh_p50_ms"] = a["fresh_p50_ms"] - d["fresh_p50_ms"]
    res["throughput_ratio"] = a["rps"] / d["rps"]
    res["bulk_ratio"] = a["bulk_MBps"] / d["bulk_MBps"]
    res["h2_added_p50_ms"] = a["h2_p50_ms"] - d["h2_p50_ms"]
    res["h2_throughput_ratio"] = a["h2_rps"] / d["h2_rps"]
    res["agent_args"] = args.agent_arg
    res["agent_loop"] = args.loop
    res["agent_cpu_us_per_request"] = agent_cpu / max(agent_reqs, 1) * 1e6
    res["cpus"] = os.cpu_count()
    res["loadavg_after"] = os.getloadavg()[0]
    return res


async def compare_loops(args: argparse.Namespace) -> dict:
    """Agent CPU per passthrough request on each loop: one agent per loop in front of the same
    app, closed-loop rounds alternating between them (so background load hits both alike)."""
    loops = ["asyncio", "uvloop"]
    app = await asyncio.create_subprocess_exec(sys.executable, "-c", APP, stdout=asyncio.subprocess.PIPE)
    app_port = int(await app.stdout.readline())
    cpu = {k: 0.0 for k in loops}
    reqs = {k: 0 for k in loops}
    rps: dict[str, list[float]] = {k: [] for k in loops}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with contextlib.AsyncExitStack() as stack:
                agents = {}
                for k in loops:
                    (Path(tmp) / k).mkdir()
                    agents[k] = await stack.enter_async_context(run_agent(
                        Path(tmp) / k, auth_material(), [f"0:{app_port}:http"], extra=args.agent_arg,
                        env={"TPENV_AGENT_LOOP": k}))
                    # The agent says which loop it runs: a missing uvloop must not pass for one.
                    await asyncio.wait_for(agents[k].log_seen(f"event loop: {k}", past=True), 5)
                for k in loops:  # warm up
                    await throughput(agents[k].port("http"), 0.5, args.concurrency)
                for i in range(args.rounds * 2):
                    for k in (loops if i % 2 == 0 else loops[::-1]):
                        pid = agents[k].proc.pid
                        c0, t0 = cpu_seconds(pid), time.perf_counter()
                        r = await throughput(agents[k].port("http"), args.seconds / args.rounds, args.concurrency)
                        cpu[k] += cpu_seconds(pid) - c0
                        reqs[k] += int(r * (time.perf_counter() - t0))
                        rps[k].append(r)
    finally:
        app.kill()
        await app.wait()
    res = {k: {"agent_cpu_us_per_request": cpu[k] / max(reqs[k], 1) * 1e6, "rps": statistics.fmean(rps[k]),
               "requests": reqs[k]} for k in loops}
    res["uvloop_cpu_vs_asyncio"] = res["uvloop"]["agent_cpu_us_per_request"] / res["asyncio"]["agent_cpu_us_per_request"]
    res["concurrency"], res["cpus"], res["loadavg_after"] = args.concurrency, os.cpu_count(), os.getloadavg()[0]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--bulk-mb", type=int, default=20)
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="the sidecar's event loop (TPENV_AGENT_LOOP)")
    p.add_argument("--compare-loops", action="store_true",
                   help="only the agent's CPU per request on asyncio's loop and on uvloop, alternating rounds")
    p.add_argument("--agent-arg", action="append", default=[],
                   help="extra sidecar option, repeatable (e.g. --agent-arg=--http1-passthrough --agent-arg=route)")
    args = p.parse_args()
    if args.compare_loops:
        res = asyncio.run(compare_loops(args))
        for k in ("asyncio", "uvloop"):
            print(f"{k:8} agent CPU {res[k]['agent_cpu_us_per_request']:5.1f} us per request  "
                  f"({res[k]['rps']:.0f} req/s, c={args.concurrency})")
        print(f"uvloop / asyncio agent CPU per request: {res['uvloop_cpu_vs_asyncio']:.2f} "
              f"(load average {res['loadavg_after']:.1f})")
        print(json.dumps(res))
        return
    res = asyncio.run(run(args))
    d, a = res["direct"], res["agent"]
    rows = [("keep-alive p50 (ms)", "keepalive_p50_ms"), ("keep-alive p99 (ms)", "keepalive_p99_ms"),
            ("fresh conn p50 (ms)", "fresh_p50_ms"), ("fresh conn p99 (ms)", "fresh_p99_ms"),
            (f"requests/s (c={args.concurrency})", "rps"), ("bulk MB/s", "bulk_MBps"),
            ("h2 call p50 (ms)", "h2_p50_ms"), ("h2 call p99 (ms)", "h2_p99_ms"),
            (f"h2 calls/s (1 conn, c={args.concurrency})", "h2_rps")]
    print(f"{'':28} {'direct':>10} {'agent':>10}")
    for label, key in rows:
        print(f"{label:28} {d[key]:10.3f} {a[key]:10.3f}")
    print(f"added p50 {res['added_p50_ms']:.3f} ms (target <= 0.3), p99 {res['added_p99_ms']:.3f} ms; "
          f"throughput ratio {res['throughput_ratio']:.2%} (target >= 85%), bulk ratio {res['bulk_ratio']:.2%}")
    print(f"h2 (gRPC-like, always routed per stream): added p50 {res['h2_added_p50_ms']:.3f} ms, "
          f"throughput ratio {res['h2_throughput_ratio']:.2%}")
    print(f"agent CPU per passthrough request: {res['agent_cpu_us_per_request']:.1f} us "
          f"({res['cpus']} CPUs, load average {res['loadavg_after']:.1f}: the agent, app and load generator share them)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
