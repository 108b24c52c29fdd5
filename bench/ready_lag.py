#!/usr/bin/env python3
"""How long after the EndpointSlice says "only the new pod" does a request through the ClusterIP
reach the new pod? (issue 11 point 4: what "ready" can and cannot guarantee.)

tpenv's "ready" waits for the EndpointSlices (tpenv/engine/endpoints.py); kube-proxy programs
each node from them afterwards. This measures that second lag on the cluster at hand: a 1-replica
echo Deployment behind a ClusterIP Service is rolled (`kubectl rollout restart`) ROUNDS times
while a client pod sends one GET on a new connection every 20 ms to the ClusterIP and records
who answered. On this machine the host and the pods share one clock, so the host's arrival time
of the settled EndpointSlice (a `kubectl get -w` stream) compares with the pod's send times.

Per round: settled = the first slice event listing only the new pod as ready; then the first
request answered by the new pod, and the last request after settled that was refused or
answered by the old pod (its lag: how long after settled a request could still miss).

    .venv/bin/python bench/ready_lag.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.kit.apps import testapp_image  # noqa: E402
from tests.kit.kubectl import TEST_LABEL, apply, kubectl, kubectl_binary, kubectl_json  # noqa: E402

# In the client pod: one GET per 20 ms on a new connection for "seconds"; one JSON line each.
# Paced by sleep on purpose: a request rate, bounded in count and time.
PROBE = textwrap.dedent("""\
    import http.client, json, sys, time
    host, seconds = sys.argv[1], float(sys.argv[2])
    end = time.time() + seconds
    while time.time() < end:
        t = time.time()
        try:
            c = http.client.HTTPConnection(host, 80, timeout=0.25)
            c.request("GET", "/")
            who = json.loads(c.getresponse().read())["pod"]
            c.close()
        except Exception as e:
            who = "!" + type(e).__name__
        print(json.dumps([t, who]), flush=True)
        time.sleep(max(0.0, t + 0.02 - time.time()))
""")


def ready_pods(slice_obj: dict) -> set[str]:
    return {(e.get("targetRef") or {}).get("name") for e in slice_obj.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready") is not False}


def one_round(ns: str, ip: str) -> dict:
    old = {p["metadata"]["name"] for p in kubectl_json("get", "pods", "-l", "app=lag", ns=ns)["items"]}
    events: list[tuple[float, set[str]]] = []
    watch = subprocess.Popen([kubectl_binary(), "-n", ns, "get", "endpointslices", "-l",
                              "kubernetes.io/service-name=lag", "-w", "--output-watch-events", "-o", "json"],
                             stdout=subprocess.PIPE, text=True, env={**os.environ})

    def read_watch() -> None:
        for line in watch.stdout:  # one compact JSON event per line
            if line.strip():
                events.append((time.time(), ready_pods(json.loads(line)["object"])))

    threading.Thread(target=read_watch, daemon=True).start()
    probe = subprocess.Popen([kubectl_binary(), "-n", ns, "exec", "-i", "client", "--", "python3", "-u", "-c",
                              PROBE, ip, "25"], stdout=subprocess.PIPE, text=True)
    time.sleep(2)  # the probe's first requests land before the roll (a rate, not a readiness wait)
    kubectl("rollout", "restart", "deployment/lag", ns=ns)
    records = [json.loads(line) for line in probe.stdout]
    probe.wait()
    watch.terminate()
    settled = next((t for t, pods in events if pods and not (pods & old)), None)
    if settled is None:
        return {"error": "the slices never listed only the new pod", "events": len(events)}
    new_first = next((t for t, who in records if t >= settled and not who.startswith("!") and who not in old), None)
    cut = new_first if new_first is not None else float("inf")
    misses = [t for t, who in records if settled <= t < cut and (who.startswith("!") or who in old)]
    # After the new pod first answered, a miss is a 0.25 s timeout on this loaded machine, not routing.
    later = [t for t, who in records if t >= cut and (who.startswith("!") or who in old)]
    return {"first_new_after_settled_ms": None if new_first is None else round((new_first - settled) * 1e3),
            "misses_before_it": len(misses), "their_errors": sorted({w for t, w in records
                                                                    if settled <= t < cut and w.startswith("!")}),
            "later_misses": len(later)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    ns = f"bench-lag-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    kubectl("label", "namespace", ns, f"{TEST_LABEL}=true")
    try:
        labels = {"app": "lag"}
        apply([{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "lag"},
                "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
                    "metadata": {"labels": labels}, "spec": {"terminationGracePeriodSeconds": 5, "containers": [
                        {"name": "app", "image": testapp_image(), "imagePullPolicy": "Never",
                         "command": ["tpenv-echo"], "env": [{"name": "ECHO_QUIET", "value": "1"}],
                         "ports": [{"name": "http", "containerPort": 8080}],
                         "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}},
               {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lag"},
                "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": "http"}]}},
               {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
                "spec": {"terminationGracePeriodSeconds": 0, "containers": [
                    {"name": "c", "image": testapp_image(), "imagePullPolicy": "Never",
                     "command": ["sleep", "3600"]}]}}], ns=ns)
        kubectl("rollout", "status", "deployment/lag", "--timeout=120s", ns=ns, timeout=150)
        kubectl("wait", "--for=condition=Ready", "pod/client", "--timeout=120s", ns=ns, timeout=150)
        ip = kubectl_json("get", "service", "lag", ns=ns)["spec"]["clusterIP"]
        rounds = []
        for i in range(args.rounds):
            kubectl("rollout", "status", "deployment/lag", "--timeout=120s", ns=ns, timeout=150)
            r = one_round(ns, ip)
            rounds.append(r)
            print(f"round {i + 1}: {r}", flush=True)
        print(json.dumps({"rounds": rounds}))
    finally:
        kubectl("delete", "namespace", ns, "--wait=false", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
