"""The kubelet's probes of an intercepted port stay with the app (agent/tpenv_agent/kubelet.py).

A chart's usual shape: readiness and liveness `httpGet` probes naming the app's port, and a
`tcpSocket` probe of it (here from a second container, as a metrics sidecar's would be). The
developer's handler knows only `/` and answers 404 to anything else. Before the fix, an all-TCP
intercept gave the probes to the handler: the pod went NotReady (the Service dropped it, and
the intercept with it) and the liveness probe restarted the app every few seconds.
"""
from __future__ import annotations

import socketserver
import threading
import time

import pytest

from test_intercept_kit import Intercepting, client_pod, curl, wait_for
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json
from tests.kit.apps import testapp_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


class Handler404:
    """The laptop's handler: 200 on `/`, 404 elsewhere; records every connection and request line
    with its user agent (a connection that sent nothing is recorded as empty)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.times: list[float] = []  # when each was seen (monotonic), for the failure message
        seen, times = self.seen, self.times

        class Conn(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline().decode("latin-1").strip()
                ua = ""
                while (h := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = h.decode("latin-1").partition(":")
                    ua = value.strip() if name.strip().lower() == "user-agent" else ua
                seen.append((line or "(empty connection)", ua))
                times.append(time.monotonic())
                path = line.split(" ")[1] if line.count(" ") >= 2 else ""
                status, body = ("200 OK", b"laptop") if path == "/" else ("404 Not Found", b"no such page")
                self.wfile.write(f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
                                 .encode() + body)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Conn)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def deploy(ns: str) -> None:
    app = {"name": "app", "image": testapp_image(), "imagePullPolicy": "Never", "command": ["tpenv-echo"],
           "ports": [{"name": "web", "containerPort": 8080}],
           "readinessProbe": {"httpGet": {"path": "/ready", "port": "web"}, "periodSeconds": 1},
           "livenessProbe": {"httpGet": {"path": "/live", "port": "web"}, "periodSeconds": 1, "failureThreshold": 2}}
    metrics = {"name": "metrics", "image": testapp_image(), "imagePullPolicy": "Never",
               "command": ["tpenv-echo", "--port", "9090"],
               "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}
    apply([{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"terminationGracePeriodSeconds": 1, "containers": [app, metrics]}}}},
           {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}}],
          ns=ns)
    kubectl("rollout", "status", "deployment/web", "--timeout=180s", ns=ns, timeout=200)


def test_all_tcp_intercept_leaves_the_kubelets_probes_to_the_app(namespace, tmp_path):
    ns = namespace
    deploy(ns)
    client_pod(ns)
    laptop = Handler404()
    run = Intercepting(tmp_path, "deployment/web", "--port", f"{laptop.port}:http", "--mount", "false", "-n", ns)
    try:
        # Stage 1: the intercept is on (all TCP) and Service traffic reaches the laptop.
        info = run.ready()
        t_ready = time.monotonic()
        pod = info["pods"][0]
        wait_for("the laptop's answer", lambda: curl(ns, f"http://web.{ns}/") == "laptop", 60)
        # Stage 2: 30 s of probes every second (readiness, liveness, tcpSocket): the pod stays
        # Ready, nothing restarts, and callers keep reaching the laptop.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(5)
            status = kubectl_json("get", "pod", pod, ns=ns)["status"]
            ready = next(c["status"] for c in status["conditions"] if c["type"] == "Ready")
            restarts = {c["name"]: c["restartCount"] for c in status["containerStatuses"]}
            assert ready == "True" and set(restarts.values()) == {0}, (ready, restarts, laptop.seen[-5:])
        assert curl(ns, f"http://web.{ns}/") == "laptop"
        # Stage 3: from the first caller's request on (before it, `tpenv intercept` itself checks
        # that something listens: one empty connection), the laptop saw only the callers'
        # requests: no probe, no empty connection, in 30 probe periods.
        first = next(i for i, (line, _) in enumerate(laptop.seen) if line.startswith("GET /"))
        assert laptop.seen[first:] and all(line == "GET / HTTP/1.1" and not ua.startswith("kube-probe/")
                                           for line, ua in laptop.seen[first:]), \
            ([(round(t - t_ready, 2), *x) for t, x in zip(laptop.times, laptop.seen)], run.stderr[-30:])
    finally:
        run.stop()
        laptop.close()
