"""Issue #11 point 5: mirror mode. The app in the cluster answers 100 % of the requests while the
laptop receives a copy of each matched one; with the laptop handler stopped the app still answers
everything and the dropped copies are counted in `tpenv status`. (The p99 comparison is the
bench's mirror phase: `devspace.py bench --only mirror`.)
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from test_intercept_kit import Intercepting, client_pod, echo_container, tpenv, wait_for
from tests.cluster.pytest_plugin import apply, kubectl

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

N = 40  # requests per stage; half carry the header


class Recorder:
    """The laptop's handler: records each request's path; an event fires when ``expect`` arrived."""

    def __init__(self, expect: int) -> None:
        self.paths: list[str] = []
        self.got_all = threading.Event()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server's name
                rec.paths.append(self.path)
                if len(rec.paths) >= expect:
                    rec.got_all.set()
                body = b"laptop"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(ns: str, prefix: str) -> list[dict]:
    """N requests from the client pod, one connection each way: even ones carry the header."""
    out = []
    for matched in (True, False):
        args = ["exec", "client", "--", "tpenv-get", f"http://mirrored.{ns}/{prefix}-{'m' if matched else 'u'}",
                "-n", str(N // 2)]
        if matched:
            args += ["-H", "x-dev: mirror"]
        cp = kubectl(*args, ns=ns, check=False)
        out += [json.loads(line) for line in cp.stdout.splitlines() if line.startswith("{")]
    return out


def test_mirror_copies_matched_requests_and_a_stopped_handler_changes_nothing(namespace, tmp_path):
    ns = namespace
    apply([{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "mirrored"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "mirrored"}},
                     "template": {"metadata": {"labels": {"app": "mirrored"}},
                                  "spec": {"containers": [echo_container("http")]}}}},
           {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mirrored"},
            "spec": {"selector": {"app": "mirrored"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}}],
          ns=ns)
    kubectl("rollout", "status", "deployment/mirrored", "--timeout=120s", ns=ns, timeout=150)
    client_pod(ns)
    laptop = Recorder(N // 2)
    run = Intercepting(tmp_path, "mirrored", "--port", f"{laptop.port}:web", "-n", ns, "--mount", "false",
                       "--mirror", "--http-header", "x-dev=mirror")
    try:
        # Stage 1: the intercept says it mirrors.
        desc = run.ready()
        assert desc["mode"] == "mirror"

        # Stage 2: every request answered by the app in the cluster, none by the laptop.
        answers = send(ns, "up")
        assert len(answers) == N and all(a.get("status") == 200 and a.get("source") == "cluster"
                                          for a in answers), answers

        # Stage 3: the laptop got a copy of each matched request, and of nothing else.
        assert laptop.got_all.wait(60), f"copies received: {laptop.paths}"
        assert sorted(laptop.paths) == ["/up-m"] * (N // 2)

        # Stage 4: the handler stops; the app still answers everything; the copies are counted as
        # dropped in `tpenv status` (the counters ride on the agent's heartbeat).
        laptop.close()
        answers = send(ns, "down")
        assert len(answers) == N and all(a.get("status") == 200 and a.get("source") == "cluster"
                                          for a in answers), answers

        def dropped():
            status = json.loads(tpenv(tmp_path, "-o", "json", "status").stdout)
            [ic] = [ic for s in status["sessions"] for ic in s.get("intercepts") or [] if ic["name"] == "mirrored"]
            return ic["mode"] == "mirror" and ic["mirror"]["dropped"] >= N // 2 and ic["mirror"]["sent"] == N // 2

        wait_for("the dropped copies in tpenv status", dropped, 60)
        text = tpenv(tmp_path, "status").stdout
        # (The counters are the agent's, per registration: a tunnel reopened meanwhile starts them again.)
        assert "intercept mirrored: mirror, copies sent " in text, text
    finally:
        assert run.stop() == 0, "".join(run.stderr)
