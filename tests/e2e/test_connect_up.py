"""`tpenv up` with a `connect:` section (env mode): the connect unit heals by itself, and an
intercepted handler reaches its pod's own Service names (the WordPress case: DB_HOST=db).

(1) healing: a request loop through the session's proxy keeps running while the manager pod is
deleted and while every connection to the API server (the relay's port-forward with them) is cut;
each time access comes back with no command typed, and the outage is reported;
(2) the handler of an intercept whose pod env says DB_HOST=db opens a plain TCP socket to
$DB_HOST:80 (no proxy support used) and reaches the db Service of the workload's namespace
through its port map, the env rewritten by tpenv.

Cluster-wide (manager install): run under flock /tmp/tpenv-clusterwide.lock.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from connect_kit import curl, manager  # noqa: F401  (module fixture)
from test_up_kit import ApiProxy, UpSession, deploy, echo_app
from test_webhook_injection import agent_image, cli_env  # noqa: F401  (module fixtures, reused)
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


class RequestLoop:
    """GET through the proxy every 0.3 s; records (time, ok)."""

    def __init__(self, proxy: str, url: str) -> None:
        self.proxy, self.url = proxy, url
        self.results: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            cp = curl("-x", f"socks5h://{self.proxy}", "--max-time", "3", self.url)
            self.results.append((time.monotonic(), cp.returncode == 0 and '"path"' in cp.stdout))
            self._stop.wait(0.3)

    def __enter__(self) -> "RequestLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def ok_after(self, t: float) -> bool:
        return any(ok for at, ok in self.results if at > t)

    def longest_gap(self, t: float) -> float:
        """The longest time between two answers after ``t`` (requests in between failed or waited)."""
        oks = [at for at, ok in self.results if ok and at > t]
        return max((b - a for a, b in zip([t, *oks], oks)), default=0.0)


def connect_proxy(up: UpSession, ns: str) -> str:
    up.wait_ready(f"connect/{ns}")
    return up.until("the connection's proxy in status",
                    lambda: (up.status().get("connection") or {}).get("proxy"), 60)


def test_up_connect_heals_after_manager_restart_and_cut_port_forward(manager, namespace, tmp_path, kubeconfig):
    ns = namespace
    deploy("hello", ns)
    (tmp_path / "telepresence.yaml").write_text(f"namespace: {ns}\nconnect:\n  mode: env\n")
    api = ApiProxy(Path(kubeconfig), tmp_path / "kubeconfig")
    api.start()
    try:
        with UpSession(tmp_path, env={"KUBECONFIG": str(api.kubeconfig)}) as up, \
                RequestLoop(connect_proxy(up, ns), f"http://hello.{ns}/loop") as loop:
            up.until("a first answer through the connection", lambda: loop.ok_after(0), 60)

            # -- stage 1: the manager pod is deleted: a new one, the relay reconnects by itself -----
            t0 = time.monotonic()
            kubectl("delete", "pod", "-l", "app.kubernetes.io/name=tpenv-manager", "--wait=false", ns="tpenv")
            up.wait_output(r"relay session back", 120)
            back = time.monotonic()
            up.until("an answer after the reconnection", lambda: loop.ok_after(back), 60)
            after_restart = loop.longest_gap(t0)

            # -- stage 2: every connection to the API server is cut (the port-forward with them) ---
            t1 = time.monotonic()
            assert api.cut() > 0
            up.wait_output(r"relay session back", 120, count=2)
            back = time.monotonic()
            up.until("an answer after the cut", lambda: loop.ok_after(back), 60)
            after_cut = loop.longest_gap(t1)
            print(f"longest wait for an answer: {after_restart:.1f}s around the manager pod's deletion, "
                  f"{after_cut:.1f}s around the cut")
            assert after_restart < 60 and after_cut < 60  # seconds, not a timeout: bounded generously on a busy machine
            assert up.unit(f"connect/{ns}")["state"] == "ready"
            # status's connection section is refreshed every few seconds: wait for it to count both
            up.until("both reconnections in status", lambda: up.status()["connection"]["reconnects"] >= 2, 30)
    finally:
        api.stop()


HANDLER = '''
import json, os, socket, sys
host = os.environ["DB_HOST"]
s = socket.create_connection((host, 80), timeout=10)      # a plain socket: no proxy variables used
s.sendall(b"GET /from-handler HTTP/1.1\\r\\nHost: db\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
body = json.loads(data.partition(b"\\r\\n\\r\\n")[2])
open("answer.json", "w").write(json.dumps({"db_host": host, "path": body["path"], "pod": body.get("pod")}))
import time; time.sleep(3600)
'''


def test_intercepted_handler_reaches_db_by_the_pods_short_name(manager, namespace, tmp_path):
    ns = namespace
    # -- stage 1: the app's pod says DB_HOST=db; the db Service is in its namespace --------------
    app = echo_app("wp")
    app[0]["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "DB_HOST", "value": "db"})
    apply(app, ns=ns)
    deploy("db", ns)
    kubectl("rollout", "status", "deployment/wp", "--timeout=120s", ns=ns, timeout=150)
    db_pods = {p["metadata"]["name"] for p in kubectl_json("get", "pods", "-l", "app=db", ns=ns)["items"]}

    # -- stage 2: tpenv up with connect (env mode) and the intercept's handler ----------------------
    (tmp_path / "handler.py").write_text(HANDLER)
    (tmp_path / "telepresence.yaml").write_text(
        f"namespace: {ns}\nconnect:\n  mode: env\nintercepts:\n  - workload: deployment/wp\n    port: 18080:web\n"
        f"    mount: false\n    run: {{command: [python3, handler.py], cwd: {tmp_path}, restart: never}}\n")
    with UpSession(tmp_path) as up:
        up.wait_ready(f"connect/{ns}", "handler/wp", timeout=240)
        answer = up.until("the handler's answer from db", lambda: (tmp_path / "answer.json").exists()
                          and json.loads((tmp_path / "answer.json").read_text()), 90)

        # -- stage 3: it reached the db Service through a port map; the env said where -----------
        assert answer["path"] == "/from-handler" and answer["pod"] in db_pods, answer
        assert answer["db_host"].startswith("127.77."), answer
        # status's connection section is refreshed every few seconds: wait for the map to show
        maps = up.until("db's port map in status", lambda: (lambda m: m if f"db.{ns}" in m else None)(
            up.status()["connection"].get("port_maps") or {}), 30)
        assert maps[f"db.{ns}"] == answer["db_host"], maps  # (wp's own Service too: the kubelet's WP_SERVICE_HOST)
        # the address is this machine's loopback, nothing else listens there
        with socket.create_connection((answer["db_host"], 80), timeout=5):
            pass
