#!/usr/bin/env python3
"""`tpenv up` latencies (issue 6, done-when 7), against the cluster of $KUBECONFIG:

1. `tpenv up` started -> the first in-cluster request answered by the laptop's handler,
   a) with the agent already installed, b) with the agent injected by this `up` (a fresh Deployment;
   its floor, a plain rollout of the same Deployment -> the first answer from a new pod, is measured
   just before each run and reported beside it: pod start and kube-proxy's sync are not tpenv's);
2. a deleted pod's replacement Ready -> the intercept serving again;
3. a handler source file saved -> the restarted handler answering in-cluster requests.

    KUBECONFIG=... .venv/bin/python bench/up_latency.py [--runs 3] [--keep]

The in-cluster client is a pod running `curl` in a loop (a new connection each time, ~20 ms
apart); every answer is stamped on this machine as its line arrives, so each figure has that
resolution (plus the `kubectl exec` stream's latency). Pod readiness comes from a
`kubectl get -w` stream, stamped the same way. The `tpenv up` output is stamped too, to show
where the time of (1) goes. Median of --runs runs each (every wait bounded by a timeout; a run
that times out is reported, not counted). Output: a table, and bench/results/up-latency-<time>.json
plus bench/results/up-latency-latest.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.up_kit import (Stream, Up, answers, cluster, deploy, injecting_run, laptop, median,  # noqa: E402
                          phases_median, pod_names)
from tests.kit.kubectl import TEST_LABEL, apply, kubectl, kubectl_binary  # noqa: E402
from tests.kit.apps import set_version, testapp_image, write_handler  # noqa: E402

# The bound of every single wait (--timeout): past it, a run counts as failed, not as a figure.
# tests/e2e/test_up_first_run.py holds a first `tpenv up` to it.
WAIT = 90.0
TARGETS = {"up_to_first_answer_installed": 1.5, "up_to_first_answer_injecting": 1.5,
           "pod_ready_to_serving": 2.0, "save_to_new_handler_answering": 1.0}


def say(msg: str) -> None:
    print(f"[up-latency] {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=WAIT, help="bound of every single wait, in seconds")
    ap.add_argument("--keep", action="store_true", help="keep the namespace and the work dir")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where the JSON reports go")
    args = ap.parse_args()
    runs, to = max(1, args.runs), args.timeout

    ns = "tpenv-uplat-" + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
    work = Path(tempfile.mkdtemp(prefix="up-latency-"))
    write_handler(work / "h")
    server = work / "h" / "server.py"
    results: dict[str, list[float]] = {k: [] for k in TARGETS}
    failures: dict[str, list[str]] = {k: [] for k in TARGETS}
    marks: dict[str, list[dict[str, float]]] = {"installed": [], "injecting": []}
    extra: dict[str, list[float]] = {"pod_delete_to_ready": [], "plain_rollout_to_new_pod_answer": []}
    say(f"namespace {ns}, work dir {work}, {runs} run(s) each")

    def first_answer(up: Up, client: Stream, mode: str, label: str, i: int) -> None:
        """(1): start ``up`` and time the first laptop answer; its phases go to ``marks[mode]``."""
        key = f"up_to_first_answer_{mode}"
        t0 = up.start()
        t = client.first(laptop(), t0, to)
        (results[key].append(round(t - t0, 3)) if t else failures[key].append(f"run {i}: no laptop answer within {to}s"))
        marks[mode].append(up.marks() | ({"first_answer": round(t - t0, 3)} if t else {}))
        say(f"{label} run {i}: {t - t0 if t else None}")

    apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {TEST_LABEL: "true"}}})
    try:
        for _ in range(60):
            if kubectl("get", "serviceaccount", "default", ns=ns, check=False).returncode == 0:
                break
            time.sleep(0.5)
        apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
               "spec": {"terminationGracePeriodSeconds": 0, "containers": [
                   {"name": "c", "image": testapp_image(), "imagePullPolicy": "Never",
                    "command": ["sleep", "36000"]}]}}, ns=ns)
        deploy("warm", ns)
        kubectl("wait", "--for=condition=Ready", "pod/client", "--timeout=120s", ns=ns, timeout=150)
        port = int(subprocess.check_output([sys.executable, "-c", "import socket; s=socket.socket(); "
                                            "s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"]))
        warm = Up(work, ns, "warm", port)
        stream = answers(ns, f"http://warm.{ns}/")
        try:
            # Inject the agent once (untimed): the "installed" runs start from there.
            warm.start()
            if stream.first(laptop(), warm.started, to) is None:
                raise RuntimeError("the first `tpenv up` never served; output:\n"
                                   + "\n".join(x for _, x in warm.stream.lines[-40:]))
            warm.stop()

            # -- 1a: up -> first answer, agent installed ---------------------------------------
            for i in range(runs):
                if stream.first(cluster, time.monotonic(), to) is None:
                    raise RuntimeError("the cluster did not answer again after `up` stopped")
                first_answer(warm, stream, "installed", "1a", i)
                if i < runs - 1:
                    warm.stop()

            # -- 2: pod replacement Ready -> serving again (up still running from the last 1a run) ---
            for i in range(runs):
                old = pod_names(ns, "warm")
                pods = Stream([kubectl_binary(), "-n", ns, "get", "pods", "-l", "app=warm", "-w", "-o",
                               'jsonpath={.metadata.name} {.status.conditions[?(@.type=="Ready")].status} '
                               '{.metadata.deletionTimestamp}{"\\n"}'])
                try:
                    time.sleep(0.5)  # the watch's first listing
                    t_del = time.monotonic()
                    kubectl("delete", "pod", *old, "--wait=false", "--ignore-not-found", ns=ns)

                    def new_ready(line: str) -> bool:
                        parts = line.split()
                        return len(parts) == 2 and parts[0] not in old and parts[1] == "True"

                    t_ready = pods.first(new_ready, t_del, to)
                finally:
                    pods.stop()
                if t_ready is None:
                    failures["pod_ready_to_serving"].append(f"run {i}: no replacement Ready within {to}s")
                    continue
                extra["pod_delete_to_ready"].append(round(t_ready - t_del, 3))
                t = stream.first(laptop(), t_ready, to)
                (results["pod_ready_to_serving"].append(round(t - t_ready, 3)) if t else
                 failures["pod_ready_to_serving"].append(f"run {i}: not serving within {to}s of Ready"))
                say(f"2 run {i}: {t - t_ready if t else None}")

            # -- 3: save -> the restarted handler answers ----------------------------------------
            for i in range(runs):
                version = f"v{i + 2}"
                time.sleep(1.0)  # let the previous restart settle (not part of any figure)
                t0 = time.monotonic()
                set_version(server, version)
                t = stream.first(laptop(version), t0, to)
                (results["save_to_new_handler_answering"].append(round(t - t0, 3)) if t else
                 failures["save_to_new_handler_answering"].append(f"run {i}: {version} not seen within {to}s"))
                say(f"3 run {i}: {t - t0 if t else None}")
            warm.stop()
        finally:
            stream.stop()
            if warm.stream is not None and warm.stream.proc.poll() is None:
                warm.stream.stop()

        # -- 1b: up -> first answer, with injection (a fresh Deployment each run), after its floor --
        for i in range(runs):
            r = injecting_run(ns, work, f"fresh{i}", port, to)
            if r["floor_s"] is not None:
                extra["plain_rollout_to_new_pod_answer"].append(r["floor_s"])
            key = "up_to_first_answer_injecting"
            (results[key].append(r["up_s"]) if r["up_s"] is not None else
             failures[key].extend(f"run {i}: {f}" for f in r["failures"]))
            marks["injecting"].append(r["marks"])
            say(f"1b run {i}: floor {r['floor_s']}, up {r['up_s']}")
    finally:
        if not args.keep:
            kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
            shutil.rmtree(work, ignore_errors=True)

    # -- report ------------------------------------------------------------------------------------
    rows = []
    for key, target in TARGETS.items():
        m = median(results[key])
        rows.append({"figure": key, "median_s": m, "runs_s": results[key], "target_s": target,
                     "met": m is not None and m <= target, "failures": failures[key]})
    report = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "runs": runs,
              "host": {"cpus": os.cpu_count(), "load": os.getloadavg()}, "figures": rows,
              "phases_of_up": {k: phases_median(v) for k, v in marks.items()},
              "pod_delete_to_ready_s": extra["pod_delete_to_ready"],
              "plain_rollout_to_new_pod_answer_s": extra["plain_rollout_to_new_pod_answer"],
              "injecting_minus_plain_rollout_s": (
                  round(median(results["up_to_first_answer_injecting"]) - median(extra["plain_rollout_to_new_pod_answer"]), 3)
                  if results["up_to_first_answer_injecting"] and extra["plain_rollout_to_new_pod_answer"] else None)}
    print()
    print(f"{'figure':<34} {'median':>8} {'target':>7}  runs")
    for r in rows:
        med = f"{r['median_s']:.2f}s" if r["median_s"] is not None else "-"
        print(f"{r['figure']:<34} {med:>8} {r['target_s']:>6.1f}s  "
              f"{', '.join(f'{x:.2f}' for x in r['runs_s'])}{'  FAILED: ' + '; '.join(r['failures']) if r['failures'] else ''}")
    for k, ph in report["phases_of_up"].items():
        print(f"up ({k}), median seconds from start: " + ", ".join(f"{p} {v:.2f}" for p, v in ph.items()))
    print(f"pod delete -> replacement Ready (not tpenv's): {extra['pod_delete_to_ready']}")
    print(f"plain rollout -> first answer from a new pod (the floor of 1b, not tpenv's): "
          f"{extra['plain_rollout_to_new_pod_answer']}; 1b minus that floor (medians): "
          f"{report['injecting_minus_plain_rollout_s']}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for path in (out / f"up-latency-{stamp}.json", out / "up-latency-latest.json"):
        path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / f'up-latency-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
