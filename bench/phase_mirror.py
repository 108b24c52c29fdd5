"""The rows of a mirror intercept (issue #11): the app answers every request while copies of the
matched ones go to the laptop, and a stopped laptop handler must not move the app's p99.

Latency steps on one path (in-cluster caller -> Service -> agent -> app), one run:

- a mirror whose laptop handler answers (one step; its p99 as a ratio to the pooled baseline);
- ``rounds`` alternating rounds of the baseline (no mirror intercept at all) and of a mirror whose
  handler is gone (every copy refused), each ``lat_n`` requests at ``lat_rate`` on one kept-alive
  connection, the order flipped every round so neither side always runs first. On a loaded
  machine the p99 of 500 samples is five requests and moves with whatever else runs: the rows
  carry the p99 of the pooled samples of each side, and each round's pair, so one noisy round
  shows as one.
"""
from __future__ import annotations

import socket

from bench.cluster_setup import kubectl
from bench.common import Unavailable, log
from bench.load import summary
from bench.processes import Intercept
from bench.session import Bench

KEYS = [("latency", "mirror_baseline"), ("latency", "mirror_handler_up"), ("latency", "mirror_handler_stopped"),
        ("latency", "mirror_stopped_unmatched")]
HEADERS = {"x-bench": "yes"}
ARGS = ("--name", "bench-mirror", "--mount", "false", "--mirror", "--http-header", "x-bench=yes")


def _closed_port() -> int:
    """A local port nothing listens on (the handler that has stopped)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(bench: Bench, label: str, headers: dict | None = HEADERS) -> dict:
    """One latency step; once more when the Service refused it (on this loaded machine the app pod's
    1 s readiness probe can time out and take it out of the endpoints for a moment): one lost step
    of eight would otherwise lose every round's rows."""
    try:
        return _measure_once(bench, label, headers)
    except Unavailable as e:
        log(f"  {label}: {e}; once more when the app pod is Ready")
        bench.notes.append(f"mirror step {label} ran twice: the first failed ({' '.join(str(e).split())[:160]})")
        kubectl("wait", "--for=condition=Ready", "pod", "-l", "app=bench-app", "--timeout=90s", ns=bench.ns,
                timeout=120, check=False)
        return _measure_once(bench, label, headers)


def _measure_once(bench: Bench, label: str, headers: dict | None) -> dict:
    """One latency step, with the agent's CPU per request over it (the figure the machine's other
    load moves least: a p99 is the five slowest of 500, and those are often someone else's)."""
    cpu0 = bench.agent_procs.sample()[0] if bench.agent_procs else None
    [r] = bench.cluster([bench.lat(label, bench.app_ip, 80, headers=headers, raw=True, idle=False)])
    r = bench.checked(r, by="cluster")  # a mirror never answers: the app does, every time
    if cpu0 is not None and bench.agent_procs:
        r["agent_cpu_us_per_req"] = (bench.agent_procs.sample()[0] - cpu0) / r["n"] * 1e6
    return r


def _pooled(rounds: list[dict]) -> dict:
    samples = [x / 1e3 for r in rounds for x in r["samples_ms"]]
    out = {"n": len(samples), "errors": sum(r["errors"] for r in rounds), **summary(samples),
           "rounds_p99_ms": [round(r["p99_ms"], 3) for r in rounds]}
    cpu = [r["agent_cpu_us_per_req"] for r in rounds if "agent_cpu_us_per_req" in r]
    if cpu:
        out["agent_cpu_us_per_req"] = sum(cpu) / len(cpu)
        out["rounds_agent_cpu_us_per_req"] = [round(c) for c in cpu]
    return out


def _ratio(a: float | None, b: float | None, digits: int | None = None) -> float | None:
    if not a or not b:
        return None
    return a / b if digits is None else round(a / b, digits)


def _stopped_round(bench: Bench, i: int) -> tuple[dict, dict]:
    """One round with a mirror whose handler is gone (nothing listens on its laptop port): requests
    its rule matches (a copy each, refused) and, as the control, requests it does not match (same
    tpenv client and agent state, no copy), in an order that flips every round."""
    ic = Intercept(bench.tmp / "state", "bench-app", "--port", f"{_closed_port()}:80", "--service", "bench-app",
                   "-n", bench.ns, *ARGS)
    try:
        ic.ready(240)
        out = {}
        for what in (("matched", "unmatched") if i % 4 < 2 else ("unmatched", "matched")):
            if what == "matched":
                out[what] = _measure(bench, KEYS[2][1])
            else:
                out[what] = _measure(bench, KEYS[3][1], headers=None)
        return out["matched"], out["unmatched"]
    finally:
        ic.stop()


def phase_mirror(bench: Bench) -> None:
    log("mirror intercept")
    base: list[dict] = []
    stopped: list[dict] = []
    unmatched: list[dict] = []

    def handler_up() -> None:
        bench.ic = bench.start_intercept("mirror_intercept_s", *ARGS)
        try:
            bench.find_agent()  # the agent's pod the phases before left: its CPU per request
            r = _measure(bench, KEYS[1][1])
            r.pop("samples_ms")
            bench.put(*KEYS[1], r)
        finally:
            bench.ic.stop()
            bench.ic = None

    def alternating() -> None:
        for i in range(bench.m["mirror_rounds"]):
            for what in ("baseline", "stopped") if i % 2 == 0 else ("stopped", "baseline"):
                log(f"  mirror round {i + 1}: {what}")
                if what == "baseline":
                    base.append(_measure(bench, KEYS[0][1]))
                else:
                    m, u = _stopped_round(bench, i)
                    stopped.append(m)
                    unmatched.append(u)
        b = _pooled(base)
        bench.put(*KEYS[0], b)
        for key, rounds in ((KEYS[2], stopped), (KEYS[3], unmatched)):
            s = _pooled(rounds)
            s["p99_ratio_to_baseline"] = _ratio(s["p99_ms"], b["p99_ms"])
            s["p50_ratio_to_baseline"] = _ratio(s["p50_ms"], b["p50_ms"])
            # (--smoke's 60 requests can take less than one CPU tick: no ratio then, not a crash)
            s["agent_cpu_ratio_to_baseline"] = _ratio(s.get("agent_cpu_us_per_req"), b.get("agent_cpu_us_per_req"))
            s["rounds_p99_ratio"] = [_ratio(y, x, 2) for x, y in zip(b["rounds_p99_ms"], s["rounds_p99_ms"])]
            bench.put(*key, s)

    bench.step("mirror: laptop handler up", KEYS[1:2], handler_up)
    bench.step(f"mirror: baseline / laptop handler stopped, {bench.m['mirror_rounds']} alternating rounds",
               [KEYS[0], KEYS[2], KEYS[3]], alternating)
    up, b = bench.rows.get(KEYS[1]), bench.rows.get(KEYS[0])
    if isinstance(up, dict) and isinstance(b, dict):
        up["p99_ratio_to_baseline"] = _ratio(up["p99_ms"], b["p99_ms"])
