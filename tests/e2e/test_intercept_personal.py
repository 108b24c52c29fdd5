"""Scenario 3 (seed 001): personal intercepts on HTTP/1.1 and gRPC, two sessions at once.

frontend -> backend, the frontend propagating ``x-telepresence-intercept-id`` (a tiny Python
server in the testapp image). Session A intercepts backend with ``--http-header auto``; session B
with ``x-dev=bob``. Each developer's local process is tpenv-echo run on this machine with
HOSTNAME naming it. Requests without a matching header stay in the cluster, also on one
long-lived gRPC connection opened before session B began, whose later streams go to B.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest

from test_intercept_kit import REPO, Intercepting, client_pod, curl, wait_for
from tests.cluster.pytest_plugin import _kubeconfig_env, apply, kubectl, kubectl_binary
from tests.kit.apps import testapp_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

HEADER = "x-telepresence-intercept-id"
FRONTEND = """
import http.server, urllib.request
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        req = urllib.request.Request("http://backend" + self.path)
        if self.headers.get("%s"):
            req.add_header("%s", self.headers["%s"])
        body = urllib.request.urlopen(req, timeout=10).read()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
""" % (HEADER, HEADER, HEADER)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalEcho:
    """tpenv-echo (HTTP/1.1, h2c, gRPC) on this machine, answering as ``pod: name``."""

    def __init__(self, name: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests/cluster/apps/echo.py"), "--port",
                                      str(self.port), "--host", "127.0.0.1", "--quiet"],
                                     env={**os.environ, "HOSTNAME": name}, stdout=subprocess.DEVNULL)
        wait_for(f"local echo {name}", lambda: socket.create_connection(("127.0.0.1", self.port), 1).close() or True)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def deploy(ns: str) -> None:
    def app(name: str, command: list[str]) -> list[dict]:
        return [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                 "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                          "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [
                              {"name": name, "image": testapp_image(), "imagePullPolicy": "Never",
                               "command": command, "ports": [{"containerPort": 8080, "name": "http"}],
                               "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}},
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                 "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}]
    apply(app("backend", ["tpenv-echo"]) + app("frontend", ["python3", "-c", FRONTEND]), ns=ns)
    for name in ("backend", "frontend"):
        kubectl("rollout", "status", f"deployment/{name}", "--timeout=120s", ns=ns, timeout=150)


def who(body: str) -> str:
    return json.loads(body)["pod"]


SILENT_CALLER = """
import http.client, json, sys, time
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=10)
c.connect()
time.sleep(3)
for h in sys.argv[2:]:
    name, _, value = h.partition(": ")
    c.request("GET", "/", headers={name: value})
    print(json.loads(c.getresponse().read())["pod"])
"""


def silent_then_get(ns: str, host: str, headers: list[str]) -> list[str]:
    """In the client pod: connect, say nothing for 3 s, then one request per header on that
    connection; who answered each (a cluster pod's name cut to its Deployment's, ``backend-``)."""
    out = kubectl("exec", "client", "--", "python3", "-c", SILENT_CALLER, host, *headers, ns=ns, timeout=60).stdout
    return [w if w.startswith("laptop-") else w.split("-")[0] + "-" for w in out.split()]


def test_personal_intercepts_http1_grpc_two_sessions(namespace, tmp_path):
    ns = namespace
    deploy(ns)
    client_pod(ns)
    alice, bob = LocalEcho("laptop-alice"), LocalEcho("laptop-bob")
    a = Intercepting(tmp_path, "backend", "--port", f"{alice.port}:http", "--http-header", "auto",
                     "--mount", "false", "-n", ns)
    b = grpc = None
    try:
        # Stage 1: session A with the personal header; through the propagating frontend.
        info_a = a.ready()
        assert info_a["match"]["headers"] == {HEADER: re.escape(info_a["id"])}
        wait_for("alice's answer", lambda: who(curl(ns, f"http://frontend.{ns}/", f"{HEADER}: {info_a['id']}"))
                 == "laptop-alice")
        assert who(curl(ns, f"http://frontend.{ns}/")).startswith("backend-")

        # Stage 2: one gRPC connection opened now, still all in the cluster; it stays open while B starts.
        grpc = subprocess.Popen([kubectl_binary(), "-n", ns, "exec", "client", "--", "tpenv-get", "--grpc",
                                 "-H", "x-dev: bob", "-n", "60", "--interval", "0.25", f"http://backend.{ns}/echo.Echo/Say"],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "KUBECONFIG": _kubeconfig_env()})
        lines: list[dict] = []
        threading.Thread(target=lambda: [lines.append(json.loads(x)) for x in grpc.stdout], daemon=True).start()
        wait_for("the first gRPC answers", lambda: sum(x.get("status") == "OK" for x in lines) >= 2
                 or grpc.poll() is not None, 60)
        # Before the channel's first answer, only connection errors are excused: kube-proxy may
        # still send a new connection to the pod the agent's rollout replaced (there is no event
        # for its sync). From the first answer on, the one connection must carry every request.
        first_ok = next((i for i, x in enumerate(lines) if x.get("status") == "OK"), None)
        assert first_ok is not None, (lines, grpc.poll())
        assert all(x.get("error", "").startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED")) for x in lines[:first_ok]), lines
        assert all(x.get("status") == "OK" for x in lines[first_ok:]), lines

        # Stage 3: session B, another header, same workload, at the same time as A.
        b = Intercepting(tmp_path, "backend", "--name", "bob", "--port", f"{bob.port}:http",
                         "--http-header", "x-dev=bob", "--mount", "false", "-n", ns)
        b.ready()
        assert who(curl(ns, f"http://backend.{ns}/", "x-dev: bob")) == "laptop-bob"
        assert who(curl(ns, f"http://frontend.{ns}/", f"{HEADER}: {info_a['id']}")) == "laptop-alice"
        assert who(curl(ns, f"http://backend.{ns}/", "x-dev: carol")).startswith("backend-")
        # A connection opened ahead of its requests (a pool's spare) and silent past the agent's
        # --sniff-timeout (2 s) still has each request routed by its header.
        assert silent_then_get(ns, f"backend.{ns}", ["x-dev: bob", "x-dev: carol"]) == ["laptop-bob", "backend-"]
        rc = grpc.wait(60)
        served = lines[first_ok:]
        assert rc == 0 or first_ok > 0, served[-3:]  # tpenv-get exits 1 when any request failed
        sources = [x["pod"] for x in served]
        assert sources[0].startswith("backend-") and sources[-1] == "laptop-bob", sources
        assert all(x["status"] == "OK" for x in served), served
    finally:
        for run in (b, a):
            if run is not None:
                run.stop()
        if grpc is not None and grpc.poll() is None:
            grpc.kill()
        alice.close()
        bob.close()
    wait_for("the cluster's answer", lambda: who(curl(ns, f"http://backend.{ns}/", "x-dev: bob")).startswith("backend-"))
