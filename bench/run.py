#!/usr/bin/env python3
"""tpenv benchmarks: the intercept data path next to its baselines, in one run (issues 4 and 7).

    python3 devspace.py bench [--quick | --smoke] [--out DIR] [--keep]

Every figure comes from this one run, against the cluster of $KUBECONFIG (the local one by
default), in a namespace of its own that is deleted at the end:

- the app: a Deployment running bench/server.py (from a ConfigMap) in the tpenv/testapp image,
  with two Services: ``bench-app`` (intercepted: tpenv moves its targetPort to the agent) and
  ``bench-direct`` (same pods, app port: never touched);
- in-cluster load: bench/load.py run inside a client pod (``kubectl exec -i ... python3 -``);
  host load: the same script on loopback; the developer's handler: bench/server.py on 127.0.0.1;
- tpenv: ``tpenv intercept`` as a subprocess (global with the volume mount, then a header one).

Baselines: (a) in-cluster client -> app directly, (b) ``kubectl port-forward`` from the host,
(c) loopback TCP on the host, (d) in-cluster client -> agent in passthrough -> app.

A row that cannot be measured (a tpenv feature that does not work yet, a tool missing) is
reported as "unavailable: <reason>"; the run goes on. Output: a table on stdout, and
bench/results/<time>-<mode>.json, latest-<mode>.json and a PNG chart (matplotlib, when installed).

The code: this file is the command line and the order of the phases; bench/session.py the state of a
run and the step that turns a failure into "unavailable"; bench/phase_*.py the phases; bench/rows.py
the modes, rows and targets; bench/report.py the JSON, table, Markdown and chart; bench/cluster_setup.py,
bench/processes.py and bench/meters.py the cluster, the processes started and what is sampled.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: bench.* and tests.cluster.*

from bench.common import BENCH, log  # noqa: E402
from bench.meters import infra_pids  # noqa: E402
from bench.phase_baselines import phase_loopback, phase_port_forward  # noqa: E402
from bench.phase_intercept import phase_header, phase_intercept  # noqa: E402
from bench.phase_mirror import phase_mirror  # noqa: E402
from bench.phase_passthrough import phase_passthrough  # noqa: E402
from bench.phase_up import phase_up  # noqa: E402
from bench.report import chart, markdown, result, table  # noqa: E402
from bench.rows import PHASES, ROWS  # noqa: E402
from bench.session import Bench  # noqa: E402


def run(bench: Bench) -> dict:
    """Set up, run the phases asked for in order, take down; every row ends up measured or "unavailable"."""
    load0 = os.getloadavg()
    api0 = infra_pids()
    try:
        bench.setup()
        if "loopback" in bench.only:
            phase_loopback(bench)
        if "intercept" in bench.only:
            phase_intercept(bench)
        elif "passthrough" in bench.only or "header" in bench.only or "mirror" in bench.only:
            bench.inject_only()
        if "passthrough" in bench.only:
            phase_passthrough(bench)
        if "port-forward" in bench.only:
            phase_port_forward(bench)
        if "header" in bench.only:
            phase_header(bench)
        if "mirror" in bench.only:
            phase_mirror(bench)
        if "up" in bench.only:
            phase_up(bench)
    except Exception as e:  # noqa: BLE001 - setup broke: every row not measured says so
        log(f"run stopped: {type(e).__name__}: {e}")
        bench.notes.append(f"run stopped: {type(e).__name__}: {e}")
        bench.unavailable([(g, k) for g, k, _ in ROWS], f"the run stopped early: {type(e).__name__}: {e}")
    finally:
        bench.cleanup()
    bench.unavailable([(g, k) for g, k, _ in ROWS], "not measured" if bench.only == set(PHASES)
                      else f"not measured (--only {','.join(sorted(bench.only))})")
    if infra_pids() != api0:
        bench.notes.append(f"the cluster's daemons restarted during this run (pids {api0} -> {infra_pids()}: "
                           "another session's `cluster down/up`?); rows measured around it are suspect")
    return result(bench, load0)



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="day-to-day figures, under 3 minutes")
    g.add_argument("--smoke", action="store_true", help="every row once with tiny counts (CI), under a minute")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="results directory (default bench/results)")
    p.add_argument("--keep", action="store_true", help="keep the bench namespace afterwards")
    p.add_argument("--profile", action="store_true",
                   help="sample the tpenv client and the agent with py-spy during the intercept's bulk and "
                        "concurrency steps and the passthrough rounds (top functions in the JSON)")
    p.add_argument("--only", metavar="PHASE,...", help=f"run only these phases of {','.join(PHASES)} "
                   "(the agent is still injected by a first tpenv intercept when a phase needs it)")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(PHASES)
    if only - set(PHASES):
        p.error(f"--only: unknown phase(s) {', '.join(sorted(only - set(PHASES)))}; known: {', '.join(PHASES)}")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.out.mkdir(parents=True, exist_ok=True)
    stamp0 = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    prof = args.out / f"profiles-{stamp0}" if args.profile else None
    if prof:
        prof.mkdir(parents=True, exist_ok=True)
    b = Bench(mode, args.out, args.keep, prof, only)

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    res = run(b)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res["only"] = sorted(only)
    if only != set(PHASES):
        mode = f"{mode}-{'-'.join(sorted(only))}"
    png = args.out / f"{stamp}-{mode}.png"
    why = chart(res, png)
    if why:
        res["notes"].append(why)
    else:
        res["chart"] = str(png)
        (args.out / f"latest-{mode}.png").write_bytes(png.read_bytes())
    text = json.dumps(res, indent=1)
    (args.out / f"{stamp}-{mode}.json").write_text(text)
    (args.out / f"latest-{mode}.json").write_text(text)
    (args.out / f"latest-{mode}.md").write_text(markdown(res))
    print(table(res))
    print(f"\nJSON: {args.out / f'{stamp}-{mode}.json'}" + (f"\nchart: {png}" if not why else f"\n{why}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
