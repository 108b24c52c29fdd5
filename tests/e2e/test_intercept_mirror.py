"""Issue #11 point 5: mirror mode. The app in the cluster answers 100 % of the requests, through
the agent, while the laptop receives exactly one copy of each matched one and none of the others;
with the laptop handler stopped the app still answers everything and the dropped copies are
counted in `tpenv status`. (The p99 comparison is the
bench's mirror phase: `devspace.py bench --only mirror`.)
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from test_intercept_kit import Intercepting, agent_in_pods, client_pod, echo_container, tpenv, wait_for
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


def mirror_counters(tmp_path) -> dict:
    """The agent's copy counters of intercept "mirrored" as `tpenv status` shows them."""
    status = json.loads(tpenv(tmp_path, "-o", "json", "status").stdout)
    [ic] = [ic for s in status["sessions"] for ic in s.get("intercepts") or [] if ic["name"] == "mirrored"]
    assert ic["mode"] == "mirror", ic
    return ic["mirror"]


def answered_by_agent_pod(ns: str, answers: list[dict]) -> bool:
    """All answers 200 from the app in the cluster, in a pod that carries the agent: the request
    went through the agent (the old pod, without one, would answer "cluster" too)."""
    pods = set(agent_in_pods(ns, "app=mirrored"))
    return bool(answers) and all(a.get("status") == 200 and a.get("source") == "cluster" and a.get("pod") in pods
                                 for a in answers)


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

        # Stage 2: the node's kube-proxy routes to the injected pod. "Ready" means the Service's
        # EndpointSlices name only agent-carrying pods; the node's rules follow a moment later, and
        # a connection sent meanwhile went to the old pod, which was exiting (one answer in 40 was a
        # refused connection in a loaded full-suite run). Unmatched requests: no copy is made.
        wait_for("the Service to route to the agent-carrying pod",
                 lambda: answered_by_agent_pod(ns, [json.loads(line) for line in kubectl(
                     "exec", "client", "--", "tpenv-get", f"http://mirrored.{ns}/warm", ns=ns,
                     check=False).stdout.splitlines() if line.startswith("{")]), 90)

        # Stage 3: every request answered by the app in the cluster, through the agent; none by the laptop.
        answers = send(ns, "up")
        assert len(answers) == N and answered_by_agent_pod(ns, answers), answers

        # Stage 4: the laptop got a copy of each matched request, and of nothing else: once the
        # agent counts all N/2 sent and none dropped, no copy is still on its way.
        assert laptop.got_all.wait(60), f"copies received: {laptop.paths}"
        wait_for("the agent to count every copy sent", lambda: mirror_counters(tmp_path) == {"sent": N // 2, "dropped": 0}, 60)
        assert sorted(laptop.paths) == ["/up-m"] * (N // 2)

        # Stage 5: the handler stops; the app still answers everything; the copies are counted as
        # dropped in `tpenv status` (the counters ride on the agent's heartbeat).
        laptop.close()
        answers = send(ns, "down")
        assert len(answers) == N and answered_by_agent_pod(ns, answers), answers

        def dropped():
            c = mirror_counters(tmp_path)
            return c["dropped"] >= N // 2 and c["sent"] == N // 2

        wait_for("the dropped copies in tpenv status", dropped, 60)
        text = tpenv(tmp_path, "status").stdout
        # (The counters are the agent's, per registration: a tunnel reopened meanwhile starts them again.)
        assert "intercept mirrored: mirror, copies sent " in text, text
    finally:
        assert run.stop() == 0, "".join(run.stderr)
