"""`tpenv up` injecting the agent -> the first in-cluster answer from the laptop's handler, next to
its floor in the same run: a plain rollout of the same Deployment -> the first answer from a new pod
(pod start and kube-proxy's sync are in both), and a rollout adding a no-op init container, the floor
of any in-pod redirect. One fresh Deployment per run; the code of a run is
bench/up_kit.py's, shared with the standalone bench/up_latency.py."""
from __future__ import annotations

import socket

from bench import cluster_setup
from bench.common import Unavailable, log
from bench.session import Bench
from bench.up_kit import injecting_run, median, phases_median, spread
from tests.kit.apps import write_handler

# Runs per mode: each takes four rollouts and `up` (~13 s with the Deployment's own start and the
# random waits that keep each step off the kubelet's relist phase, up_kit.dephase); the median of
# these. Fifteen, not five: once dephased, each step is bimodal (the pod is Ready at the first
# relist after its containers start, or one later, and kube-proxy adds its own 1 s grid), and
# nine runs still left the difference of two steps' means +-0.3 s (docs/performance.md).
RUNS = {"full": 15, "quick": 2, "smoke": 1}
# The bound of each wait in a run (a rollout, an answer): past it the run fails, the row says why.
WAIT = 90.0


def phase_up(bench: Bench) -> None:
    keys = [("up", "injecting"), ("up", "rollout_floor"), ("up", "init_floor"), ("up", "sidecar_floor")]

    def run() -> None:
        work = bench.tmp / "up"
        write_handler(work / "h")
        with socket.socket() as s:  # the handler's port: free now, the handler binds it
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ups, floors, inits, sidecars, marks, failures = [], [], [], [], [], []
        for i in range(RUNS[bench.mode]):
            r = injecting_run(bench.ns, work, f"up{i}", port, WAIT, client="bench-client",
                              image=cluster_setup.AGENT_IMAGE)
            log(f"  up run {i}: floor {r['floor_s']} s, up injecting {r['up_s']} s, init-container floor "
                f"{r['init_floor_s']} s, sidecar floor {r['sidecar_floor_s']} s, phases {r['marks']}")
            if r["init_floor_s"] is not None:
                inits.append(r["init_floor_s"])
            if r["sidecar_floor_s"] is not None:
                sidecars.append(r["sidecar_floor_s"])
            if r["floor_s"] is not None:
                floors.append(r["floor_s"])
            if r["up_s"] is not None:
                ups.append(r["up_s"])
                marks.append(r["marks"])
            failures += [f"run {i}: {f}" for f in r["failures"]]
        if not ups or not floors:
            raise Unavailable("; ".join(failures)[:400] or "no run measured")
        bench.put("up", "injecting", {"seconds": median(ups), **spread(ups), "runs": ups,
                                      "phases": phases_median(marks), **({"failures": failures} if failures else {})})
        bench.put("up", "rollout_floor", {"seconds": median(floors), **spread(floors), "runs": floors})
        if inits:
            bench.put("up", "init_floor", {"seconds": median(inits), **spread(inits), "runs": inits})
        if sidecars:
            bench.put("up", "sidecar_floor", {"seconds": median(sidecars), **spread(sidecars), "runs": sidecars})

    bench.step("up: injecting `tpenv up` and its plain-rollout floor", keys, run)
