"""Issue #11 point 4: no request lost on any transition, and "ready" means routed.

A load generator pod sends 50 requests/s to the Service (half of its workers over kept-alive
connections, half on a new connection each), cycling through header values. Meanwhile:

- the intercept is taken and left 100 times (the real InterceptRun that `tpenv intercept` runs, in
  this process: a cycle costs the cluster work, not a Python start-up); the agent stays injected,
  so no cycle rolls a pod;
- under the real `tpenv up`, the header value of the intercept's rule is rewritten in
  telepresence.yaml 20 times (hot reloads).

Every request must get a 200 answer, and the first matched request *sent* after each "ready" (or
"reload applied") must be answered by the laptop (same clock: the cluster runs on this machine).
The generator runs as its own pod and prints its records when told to stop: the test depends on
no long-lived exec stream.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import statistics
import textwrap
import time

import pytest

from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json
from tests.e2e.test_intercept_kit import LocalServer, agent_image, echo_container, wait_for
from tests.e2e.test_up_kit import UpSession
from tests.kit.apps import testapp_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CYCLES = 100
RELOADS = 20
HOLD = 0.4  # seconds an intercept (or a rule) is held: traffic must flow through it
MARGIN = 0.2  # seconds before a leave in which a request sent may arrive after it
HEADER = "x-dev"

# The load generator (its own pod, stdlib only). Pacing by sleep is the point here: it is a
# request rate, not a wait for readiness. Request n of a worker carries HEADER: values[n % len]
# ("" = no header). Stops when /tmp/stop exists, then prints one JSON line per request: send
# time, header value, connection kind, status and who answered, or the error.
LOAD = textwrap.dedent("""\
    import http.client, json, os, sys, threading, time
    host, workers, rate, values = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(",")
    out, lock = [], threading.Lock()

    def worker(i):
        keep = i % 2 == 0
        conn, n, period = None, i, workers / rate
        next_at = time.time() + i * period / workers
        while not os.path.exists("/tmp/stop"):
            value = values[n % len(values)]
            n += 1
            sent = time.time()
            rec = {"t": sent, "h": value, "keep": keep}
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, 80, timeout=30)
                conn.request("GET", "/", headers={"HEADER": value} if value else {})
                r = conn.getresponse()
                body = r.read()
                rec["s"] = r.status
                rec["who"] = "laptop" if body == b"laptop" else "app"
            except Exception as e:
                rec["err"] = type(e).__name__ + ": " + str(e)
                if conn is not None:
                    conn.close()
                conn = None
            if not keep and conn is not None:
                conn.close()
                conn = None
            with lock:
                out.append(rec)
            next_at += period
            time.sleep(max(0.0, next_at - time.time()))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rec in out:
        print(json.dumps(rec))
    print("END %d" % len(out), flush=True)
""").replace("HEADER", HEADER)


def echo_app(ns: str) -> None:
    apply([{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "busy"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "busy"}},
                     "template": {"metadata": {"labels": {"app": "busy"}},
                                  "spec": {"containers": [echo_container("http")]}}}},
           {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "busy"},
            "spec": {"selector": {"app": "busy"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}}],
          ns=ns)
    kubectl("rollout", "status", "deployment/busy", "--timeout=120s", ns=ns, timeout=150)


def settle(ns: str) -> None:
    """The rollout of the injection is over and the old template's pods are gone."""
    kubectl("rollout", "status", "deployment/busy", "--timeout=120s", ns=ns, timeout=150)
    kubectl("wait", "--for=delete", "pod", "-l", "app=busy", "--field-selector", "status.phase!=Running",
            "--timeout=120s", ns=ns, timeout=150, check=False)
    # A pod being deleted keeps phase Running through its grace period: the old template's pods
    # can still be listed after the wait above, and vanish during the cycles.
    wait_for("the old template's pods to be gone", lambda: not any(
        p["metadata"].get("deletionTimestamp") for p in kubectl_json("get", "pods", "-l", "app=busy", ns=ns)["items"]),
        120)


class Load:
    """The load generator as a pod of its own, sending to the Service's address (not its name: a
    lookup per new connection would blur the timing); its records are its log."""

    def __init__(self, ns: str, values: list[str], workers: int = 10, rate: float = 50.0) -> None:
        self.ns = ns
        ip = kubectl_json("get", "service", "busy", ns=ns)["spec"]["clusterIP"]
        apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "load"},
               "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0, "containers": [
                   {"name": "load", "image": testapp_image(), "imagePullPolicy": "Never",
                    "command": ["python3", "-c", LOAD, ip, str(workers), str(rate), ",".join(values)]}]}}, ns=ns)
        kubectl("wait", "--for=condition=Ready", "pod/load", "--timeout=120s", ns=ns, timeout=150)
        time.sleep(2)  # the generator's first requests are on their way before the first transition

    def stop(self) -> list[dict]:
        time.sleep(1)  # requests sent just after the last transition are answered before the stop
        kubectl("exec", "load", "--", "touch", "/tmp/stop", ns=self.ns)
        kubectl("wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/load", "--timeout=120s", ns=self.ns,
                timeout=150)
        out = kubectl("logs", "load", ns=self.ns, timeout=120).stdout.splitlines()
        records = [json.loads(line) for line in out if line.startswith("{")]
        assert out and out[-1] == f"END {len(records)}", f"the generator's log is incomplete: {out[-3:]}"
        return records


def check_load(records: list[dict], windows: list[tuple[float, float, str]], what: str) -> list[float]:
    """Every request answered 200; in each window (ready, left, value) the first request sent with
    ``value`` after ready reached the laptop, and every request sent in the window went where the
    rule in force sends it (``value``: the laptop; another value or none: the app). Returns how
    long after ready those first requests were sent."""
    failed = [r for r in records if r.get("s") != 200]
    span = windows[-1][1] - windows[0][0]
    assert len(records) > 40 * span, f"too few requests: {len(records)} in {span:.0f}s"
    assert {r["keep"] for r in records} == {True, False}
    assert not failed, f"{len(failed)} of {len(records)} requests failed during the {what}: {failed[:10]}"
    missed, checked, delays = [], 0, []
    for ready, left, value in windows:
        first = min((r for r in records if r["h"] == value and r["t"] > ready), key=lambda r: r["t"], default=None)
        # One sent just before the leave began may reach the agent after it: not this check's case.
        if first is None or first["t"] >= left - MARGIN:
            continue
        checked += 1
        delays.append(first["t"] - ready)
        if first["who"] != "laptop":
            missed.append((ready, first))
    # The whole window, not only its first request: the rule in force, and only it, decides.
    misrouted = [(ready, r) for ready, left, value in windows for r in records
                 if ready < r["t"] < left - MARGIN and r["who"] != ("laptop" if r["h"] == value else "app")]
    assert not misrouted, f"{len(misrouted)} requests sent while a rule held went elsewhere: {misrouted[:5]}"
    assert checked >= 0.9 * len(windows), f"only {checked} of {len(windows)} {what}s saw a matched request: " \
                                          f"the load is too thin"
    assert not missed, f"{len(missed)} of {checked} {what}s: the first request after ready went to the app: " \
                       f"{missed[:5]}"
    print(f"{what}: {len(records)} requests, 0 failed; {checked} of {len(windows)} checked for the first request "
          f"after ready (sent {statistics.median(delays):.3f} s after it at the median, {max(delays):.3f} s at most)")
    return delays


def summary(name: str, seconds: list[float]) -> str:
    s = sorted(seconds)
    return f"{name}: median {statistics.median(s):.2f} s, p90 {s[int(0.9 * (len(s) - 1))]:.2f} s, max {s[-1]:.2f} s"


async def cycles(ns: str, local_port: int, n: int) -> list[tuple[float, float, float, float]]:
    """``n`` intercept/leave cycles; (start, ready, leave began, left) of each."""
    from tpenv.config.models import Intercept
    from tpenv.engine.intercepts import InterceptRun
    from tpenv.engine.statusd import new_session_id
    from tpenv.kits.kube import Kube
    from tpenv.settings import load_settings

    settings = load_settings({"TPENV_AGENT_IMAGE": agent_image(), "TPENV_AGENT_IMAGE_PULL_POLICY": "Never"})
    intercept = Intercept.model_validate({"workload": "busy", "port": f"{local_port}:web", "mount": False,
                                          "match": {"headers": {HEADER: "transitions"}}})
    times = []
    async with await Kube.load() as kube:
        for _ in range(n):
            start = time.time()
            run = InterceptRun(kube, intercept, ns, new_session_id(), settings)
            async with run:
                await run.wait_ready(120)
                ready = time.time()
                await asyncio.sleep(HOLD)
                leaving = time.time()  # from here on, the leave: requests may go either way
            times.append((start, ready, leaving, time.time()))
    return times


def test_intercept_leave_cycles_under_load_lose_nothing(namespace):
    ns = namespace
    echo_app(ns)
    local = LocalServer("laptop")
    try:
        # Stage 1: the agent is injected once (a rollout; not part of the measured cycles).
        asyncio.run(cycles(ns, local.port, 1))
        settle(ns)
        pods = {p["metadata"]["name"] for p in kubectl_json("get", "pods", "-l", "app=busy", ns=ns)["items"]}

        # Stage 2: load on, 100 intercept/leave cycles, load off.
        load = Load(ns, ["transitions", ""])
        times = asyncio.run(cycles(ns, local.port, CYCLES))
        records = load.stop()
    finally:
        local.close()

    # Stage 3: no cycle rolled a pod: the agent, once injected, stays for the next intercept.
    after = {p["metadata"]["name"] for p in kubectl_json("get", "pods", "-l", "app=busy", ns=ns)["items"]}
    assert after == pods, f"the cycles replaced pods: {sorted(pods)} -> {sorted(after)}"

    # Stage 4: every request answered; the first matched one after each ready reached the laptop.
    print(summary("intercept (start -> ready)", [r - s for s, r, _, _ in times]))
    print(summary("leave", [e - lv for _, _, lv, e in times]))
    print(summary("whole cycle", [e - s for s, _, _, e in times]))
    check_load(records, [(r, lv, "transitions") for _, r, lv, _ in times], "intercept/leave cycle")


def up_config(ns: str, port: int, value: str) -> str:
    return ("apiVersion: tpenv/v1\n"
            f"namespace: {ns}\n"
            "intercepts:\n"
            "  - name: busy\n"
            "    workload: deployment/busy\n"
            f"    port: {port}:web\n"
            "    mount: false\n"
            f"    match: {{headers: {{{HEADER}: {value}}}}}\n")


def applied(up: UpSession, value: str) -> list[float]:
    """When `tpenv up` said an intercept with ``value`` in its rule serves (its JSON log's ts)."""
    out = []
    for line in list(up.lines):
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if str(rec.get("unit")).startswith("intercept/") and rec["message"].startswith("intercepting busy ") \
                and f"'{HEADER}': '{value}'" in rec["message"]:
            out.append(dt.datetime.fromisoformat(rec["ts"]).timestamp())
    return out


def test_header_rule_hot_reloads_under_up_lose_nothing(namespace, tmp_path):
    ns = namespace
    echo_app(ns)
    local = LocalServer("laptop")
    config = tmp_path / "telepresence.yaml"
    values = [("blue", "green")[i % 2] for i in range(RELOADS + 1)]
    config.write_text(up_config(ns, local.port, values[0]))
    try:
        with UpSession(tmp_path, "-o", "json") as up:  # JSON logs: their ts has milliseconds
            # Stage 1: up injects the agent and serves the first rule (a rollout: not measured).
            up.until("the first rule applied", lambda: applied(up, values[0]), 180)
            settle(ns)

            # Stage 2: load on; the header value rewritten 20 times, each held a moment once applied.
            load = Load(ns, ["blue", "green", ""])
            windows, reloads = [], []
            ready = time.time()  # the first rule serves since before the load started
            for i in range(1, RELOADS + 1):
                written = time.time()
                windows.append((ready, written, values[i - 1]))
                config.write_text(up_config(ns, local.port, values[i]))
                count = len(applied(up, values[i])) + 1
                ready = up.until(f"reload {i} ({values[i]}) applied",
                                 lambda: (lambda t: t[-1] if len(t) >= count else None)(applied(up, values[i])), 120,
                                 interval=0.05)
                reloads.append(ready - written)
                time.sleep(HOLD)
            windows.append((ready, time.time(), values[-1]))
            records = load.stop()
            assert up.stop() == 0, up.output
    finally:
        local.close()

    # Stage 3: every request answered; the first one with the new value after each reload reached the laptop.
    print(summary("hot reload (write -> applied)", reloads))
    check_load(records, windows[1:], "hot reload")
