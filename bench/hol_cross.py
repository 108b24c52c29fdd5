#!/usr/bin/env python3
"""Whose bulk slows whose small requests? The head-of-line row crossed (issue 13).

The row (bench/load.py ``t_hol``) puts small requests and a bulk download on the same path: through
the intercept, or through `kubectl port-forward` for its peer. On this machine both paths run through
the same API server, kubelet and containerd on the same two cores as the laptop's processes, so a
slow small request says nothing yet about where it waited. Here the two are crossed: the small
requests on one path while the bulk runs on the other.

- small through the intercept, bulk through the intercept (the row as the bench measures it)
- small through the intercept, bulk through `kubectl port-forward` (no byte of it in tpenv)
- small through `kubectl port-forward`, bulk through the intercept
- small through `kubectl port-forward`, bulk through `kubectl port-forward` (the peer's row)
- each path's small requests with no bulk, and with no bulk but a process spinning on each of the
  host's CPUs (``cpu``: a load that uses no network path at all)

If the intercept's small requests wait as long behind a bulk that never touches tpenv as behind its
own, what holds them is the shared cluster path and the machine's CPUs, not a queue of tpenv's; if
they wait far longer behind their own, something in tpenv's path queues them.

    .venv/bin/python bench/hol_cross.py [--rounds 2] [--cases intercept/-,pf/cpu,...] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import KiB, log  # noqa: E402
from bench.processes import PortForward  # noqa: E402
from bench.rows import MODES  # noqa: E402
from bench.session import Bench  # noqa: E402

# The full bench's head-of-line step: 1000 small requests at 100/s, 64 MiB bodies.
N, RATE, BULK = MODES["full"]["hol_n"], MODES["full"]["hol_rate"], MODES["full"]["hol_bytes"]


SPIN = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


def small(label: str, host: str, port: int) -> dict:
    return {"kind": "latency", "label": label, "host": host, "port": port, "n": N, "rate": RATE, "size": KiB,
            "idle": 0}


def bulkloop(label: str, host: str, port: int) -> dict:
    # Longer than the series and started first (plus the client pod's exec lag): bulk all through it.
    return {"kind": "bulkloop", "label": label, "host": host, "port": port, "bytes": BULK, "seconds": N / RATE + 4}


def crossed(bench: Bench, small_where: str, bulk_where: str | None, pf_port: int) -> dict:
    """One series: ``small_where`` / ``bulk_where`` are "intercept" (from the client pod through the
    Service to the laptop) or "pf" (from the host through `kubectl port-forward` to the app)."""
    def task(where: str, make) -> tuple[str, dict]:
        return ("cluster", make(where, bench.app_ip, 80)) if where == "intercept" else \
               ("host", make(where, "127.0.0.1", pf_port))

    out: dict[str, dict] = {}

    def run(place: str, t: dict, key: str) -> None:
        out[key] = (bench.cluster if place == "cluster" else bench.host)([t])[0]

    threads = []
    spin: list[subprocess.Popen] = []
    if bulk_where == "cpu":
        # One busy process per CPU, killed when the series ends and bounded by its own clock too
        # (no `timeout` wrapper: killing the wrapper would leave its child spinning), with no
        # stdout of ours to hold open.
        spin = [subprocess.Popen([sys.executable, "-c", SPIN, str(N / RATE + 10)], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for _ in range(os.cpu_count() or 2)]
        time.sleep(0.5)
    elif bulk_where is not None:
        place, t = task(bulk_where, bulkloop)
        threads.append(threading.Thread(target=run, args=(place, t, "bulk")))
        threads[-1].start()
        time.sleep(1.5)  # the transfer is under way before the first small request
    place, t = task(small_where, small)
    try:
        run(place, t, "small")
    finally:
        for sp in spin:
            sp.kill()
            sp.wait()
    for th in threads:
        th.join()
    s, b = out["small"], out.get("bulk") or {}
    # A lost intercept must not pass as a figure: every answer from the side its path names.
    for what, r, where in (("small requests", s, small_where), ("bulk", b, bulk_where)):
        want = {"intercept": "laptop", "pf": "cluster"}.get(where or "")
        if want and "failed" not in r and set(r.get("answered_by") or {}) != {want}:
            r["failed"] = f"{what} answered by {r.get('answered_by')}, not all by the {want}"
    return {"small": small_where, "bulk": bulk_where, "p50_ms": s.get("p50_ms"), "p99_ms": s.get("p99_ms"),
            "max_ms": s.get("max_ms"), "errors": s.get("errors"), "answered_by": s.get("answered_by"),
            "bulk_MBps": b.get("MBps"), "bulk_errors": b.get("errors"), "failed": s.get("failed") or b.get("failed")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cases", default="intercept/-,pf/-,intercept/intercept,intercept/pf,pf/intercept,pf/pf,"
                                      "intercept/cpu,pf/cpu",
                   help="SMALL/BULK pairs: SMALL intercept or pf; BULK intercept, pf, cpu or - (none)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    pairs = [c.split("/") for c in args.cases.split(",")]
    if any(len(x) != 2 or x[0] not in ("intercept", "pf") or x[1] not in ("-", "intercept", "pf", "cpu")
           for x in pairs):
        p.error(f"--cases {args.cases!r}: each is SMALL/BULK, SMALL intercept or pf, BULK intercept, pf, cpu or -")
    cases = [(x[0], None if x[1] == "-" else x[1]) for x in pairs]
    bench = Bench("full", args.out, keep=False, only={"intercept"})
    rows: list[dict] = []
    try:
        bench.setup()
        log("global intercept")
        bench.ic = bench.start_intercept("first_intercept_s", "--mount", "false")
        pf = PortForward(bench.ns, bench.app_pod(), 8080)
        try:
            for r in range(args.rounds):
                for s, b in cases if r % 2 == 0 else cases[::-1]:  # alternated: drift shows as a spread
                    log(f"round {r + 1}: small through {s}, bulk through {b or 'nothing'}")
                    row = crossed(bench, s, b, pf.port)
                    row["round"] = r + 1
                    rows.append(row)
                    log(f"  p50 {row['p50_ms'] or 0:.2f} p99 {row['p99_ms'] or 0:.2f} ms, bulk "
                        f"{row['bulk_MBps'] or 0:.0f} MB/s" + (f", failed: {row['failed']}" if row["failed"] else ""))
        finally:
            pf.stop()
    finally:
        bench.cleanup()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"hol-cross-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps({"n": N, "rate": RATE, "bulk_bytes": BULK, "rows": rows}, indent=1))
    print(f"{'small through':>14} {'bulk through':>13} {'p50 ms':>8} {'p99 ms':>8} {'bulk MB/s':>10}")
    for row in rows:
        fmt = (lambda x: f"{x:8.2f}" if isinstance(x, (int, float)) else f"{'-':>8}")
        print(f"{row['small']:>14} {row['bulk'] or '-':>13} {fmt(row['p50_ms'])} {fmt(row['p99_ms'])} "
              f"{fmt(row['bulk_MBps']):>10}")
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
