#!/usr/bin/env python3
"""`tpenv connect` next to its baselines, in one run (issue 18, done-when 7), against the cluster
of $KUBECONFIG with the manager installed (installed here, and removed at the end, when absent:
then run it under flock /tmp/tpenv-clusterwide.lock).

    KUBECONFIG=... .venv/bin/python bench/connect_bench.py [--n 2000] [--bulk-mib 256] [--lookups 300]

Rows, each measured in this run:

- outbound request latency (HTTP/1.1 keep-alive, 1 KiB answers, paced) and bulk download from
  the host to the Service ``bench-app``: through connect (the outbound core's ``dial`` behind a
  local listener, the same path as the captures' ``on_connection``: a port-forward stream of its
  own to a ready endpoint pod, tpenv/engine/outbound/direct.py), through connect with the relay
  only (``direct=False``: one relay ``direct-tcpip`` channel per connection, to the ClusterIP),
  against ``kubectl port-forward`` to a pod of the same Service;
- DNS lookups of the Service's name: through tpenv's resolver, first (cache emptied before each
  sample: the relay to kube-dns and back) and cached (timed by the same raw-socket client as the
  pod's row, in its own process; the in-process dnspython figure beside it), against the cluster
  DNS queried directly from a pod (the in-cluster floor).

Targets: throughput >= 80 % of port-forward, p50 added <= 1 ms, lookup p50 <= 5 ms first and
<= 0.2 ms cached. Output: a table, bench/results/connect-<time>.json and connect-latest.json.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cluster_setup import agent_image, kjson, kubectl, manifests  # noqa: E402
from bench.common import BENCH, log  # noqa: E402
from bench.processes import PortForward, on_host  # noqa: E402

IN_POD_DNS = r"""
import json, os, socket, struct, sys, time
server, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
port = int(sys.argv[4]) if len(sys.argv) > 4 else 53
def query(qid):
    q = struct.pack("!HHHHHH", qid, 0x100, 1, 0, 0, 0) + b"".join(
        bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    t = time.perf_counter(); s.sendto(q, (server, port)); s.recv(512); d = time.perf_counter() - t
    s.close(); return d
samples = [query(i) for i in range(n)]
print(json.dumps({"samples_ms": [x * 1e3 for x in samples]}))
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": pct(xs, 50), "p90_ms": pct(xs, 90), "p99_ms": pct(xs, 99),
            "mean_ms": statistics.fmean(xs)}


class CoreThread:
    """The outbound core on its own event loop (a thread), with a port map to ``host:port``."""

    def __init__(self, namespace: str, host: str, port: int, *, direct: bool = True) -> None:
        self.namespace, self.host, self.dport, self.direct = namespace, host, port, direct
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(120)
        if self.error:
            raise self.error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        from tpenv.engine.outbound.core import ConnectOptions, OutboundCore
        from tpenv.kits.kube import Kube
        from tpenv.kits.splice import splice

        self.stop = asyncio.Event()
        try:
            kube = await Kube.load()
            self.core = await OutboundCore(kube, ConnectOptions(namespace=self.namespace,
                                                                        direct=self.direct)).start()

            async def serve(r, w):
                up_r, up_w = await self.core.dial(self.host, self.dport)
                await splice(r, w, up_r, up_w)

            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
        except BaseException as e:  # reported by the constructor
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        await self.stop.wait()
        server.close()
        self.core.close()
        await self.core.wait_closed()
        await kube.close()

    def call(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


async def lookups(core, name: str, n: int, cold: bool) -> list[float]:
    import dns.asyncquery
    import dns.message

    host, port = core.resolver_address
    out = []
    for _ in range(n):
        if cold:
            core.resolver.forget()  # both caches: the record cache and the reply fast path
        q = dns.message.make_query(name, "A")
        t = time.perf_counter()
        r = await dns.asyncquery.udp(q, host, port=port, timeout=5)
        out.append((time.perf_counter() - t) * 1e3)
        assert r.answer, r
    return out


def manager_present() -> bool:
    return bool(kubectl("get", "deployment", "tpenv-manager", ns="tpenv", check=False).returncode == 0)


def tpenv(*args: str) -> None:
    cp = subprocess.run([sys.executable, "-m", "tpenv.cli.main", *args], capture_output=True, text=True, timeout=300)
    if cp.returncode != 0:
        raise RuntimeError(f"tpenv {' '.join(args)}: {cp.stderr.strip()[-400:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="latency samples per path")
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second, paced")
    ap.add_argument("--bulk-mib", type=int, default=256)
    ap.add_argument("--lookups", type=int, default=300)
    ap.add_argument("--keep", action="store_true", help="keep the namespace")
    args = ap.parse_args()

    ns = "bench-connect-" + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
    installed_here = False
    rows: dict = {}
    try:
        if not manager_present():
            log("installing the manager (removed at the end)")
            tpenv("manager", "install")
            installed_here = True
        kubectl("rollout", "status", "deployment/tpenv-manager", "--timeout=180s", ns="tpenv", timeout=200)
        kubectl("create", "namespace", ns)
        kubectl("apply", "-f", "-", ns=ns, input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                              "items": manifests(ns, agent_image())}))
        kubectl("rollout", "status", "deployment/bench-app", "--timeout=180s", ns=ns, timeout=200)
        kubectl("wait", "--for=condition=Ready", "pod/bench-client", "--timeout=120s", ns=ns, timeout=150)
        pod = kjson("get", "pods", "-l", "app=bench-app", ns=ns)["items"][0]["metadata"]["name"]

        # -- the two paths, set up side by side ----------------------------------------------------
        pf = PortForward(ns, pod, 8080)
        core = CoreThread(ns, f"bench-app.{ns}", 80)
        relay_core = CoreThread(ns, f"bench-app.{ns}", 80, direct=False)
        try:
            paths = {"port-forward": pf.port, "connect": core.port, "connect (relay only)": relay_core.port}
            for label, port in paths.items():
                log(f"latency and bulk through {label}")
                lat, bulk = on_host([{"kind": "latency", "host": "127.0.0.1", "port": port, "n": args.n,
                                      "rate": args.rate, "size": 1024},
                                     {"kind": "bulk", "host": "127.0.0.1", "port": port, "dir": "down",
                                      "bytes": args.bulk_mib << 20}], budget=args.n / args.rate + 600)
                rows[f"latency {label}"] = {k: lat.get(k) for k in ("n", "errors", "p50_ms", "p90_ms", "p99_ms")}
                rows[f"bulk {label}"] = {"MBps": bulk.get("MBps"), "seconds": bulk.get("seconds")}
            log("DNS lookups through tpenv's resolver and from a pod")
            name = f"bench-app.{ns}."
            rows["lookup first (tpenv)"] = summary(core.call(lookups(core.core, name, args.lookups, True)))
            # Cached: the same client as the pod's row (a raw UDP socket, a separate process), so
            # both rows time the same thing; the in-process dnspython figure (the client sharing
            # the core's event loop and parsing the reply) is kept beside it.
            rows["lookup cached (tpenv, in-process dnspython)"] = summary(
                core.call(lookups(core.core, name, args.lookups, False)))
            host, port = core.core.resolver_address
            cp = subprocess.run([sys.executable, "-c", IN_POD_DNS, host, name.rstrip("."), str(args.lookups), str(port)],
                                capture_output=True, text=True, timeout=300, check=True)
            rows["lookup cached (tpenv)"] = summary(json.loads(cp.stdout)["samples_ms"])
            dns_ip = kjson("get", "service", "kube-dns", ns="kube-system")["spec"]["clusterIP"]
            cp = kubectl("exec", "-i", "bench-client", "--", "python3", "-", dns_ip,
                         f"bench-app.{ns}.svc.cluster.local", str(args.lookups), ns=ns, input=IN_POD_DNS, timeout=300)
            rows["lookup from a pod (kube-dns)"] = summary(json.loads(cp.stdout)["samples_ms"])
            rows["connect paths taken"] = dict(core.core.direct.stats) if core.core.direct else {}
        finally:
            core.close()
            relay_core.close()
            pf.stop()
    finally:
        if not args.keep:
            kubectl("delete", "namespace", ns, "--wait=false", check=False)
        if installed_here:
            tpenv("manager", "uninstall")

    pf_lat, c_lat = rows["latency port-forward"], rows["latency connect"]
    checks = {
        "throughput >= 80% of port-forward": rows["bulk connect"]["MBps"] / rows["bulk port-forward"]["MBps"],
        "p50 added <= 1 ms": c_lat["p50_ms"] - pf_lat["p50_ms"],
        "lookup p50 first <= 5 ms": rows["lookup first (tpenv)"]["p50_ms"],
        "lookup p50 cached <= 0.2 ms": rows["lookup cached (tpenv)"]["p50_ms"],
    }
    met = {"throughput >= 80% of port-forward": checks["throughput >= 80% of port-forward"] >= 0.8,
           "p50 added <= 1 ms": checks["p50 added <= 1 ms"] <= 1.0,
           "lookup p50 first <= 5 ms": checks["lookup p50 first <= 5 ms"] <= 5.0,
           "lookup p50 cached <= 0.2 ms": checks["lookup p50 cached <= 0.2 ms"] <= 0.2}
    result = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "load": os.getloadavg(),
              "args": vars(args), "rows": rows, "targets": {k: {"value": v, "met": met[k]} for k, v in checks.items()}}
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for f in (out / f"connect-{stamp}.json", out / "connect-latest.json"):
        f.write_text(json.dumps(result, indent=2) + "\n")
    for label, r in rows.items():
        print(f"{label:<32} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    for k, v in checks.items():
        print(f"{k:<36} {v:.3f}  {'met' if met[k] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
