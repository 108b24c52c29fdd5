"""Intercept + connect together, from the developer's machine (a separate network namespace:
tests/e2e/laptop_kit.py): the WordPress case of issue 18. The intercepted workload's pod says
``DB_HOST=db``; the handler tpenv starts opens a plain socket (no proxy support) to $DB_HOST:80
and must reach the ``db`` Service of the workload's namespace, with no edit, in each mode, through
the real CLI verbs: ``tpenv intercept wp --connect MODE -- CMD`` and ``tpenv up`` with a
``connect:`` section (ns mode: each handler in its own namespaces, tpenv/engine/outbound/nsmode.py). The handler also serves the intercepted port, so every run proves the
intercept's own direction too (a request to the wp Service from a pod answers from the laptop;
in ns mode through the dialer inside the command's namespace).

Before and after each run, the same lookup and connection from the laptop fail: nothing of the
cluster is reachable except through tpenv. Cluster-wide (manager install): run under
``flock /tmp/tpenv-clusterwide.lock``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from laptop_kit import Laptop
from test_connect_capture import laptop  # noqa: F401  (fixture: the laptop namespace and its usual DNS)
from test_intercept_kit import Intercepting, tpenv_env
from test_manager_relay import relay_manager  # noqa: F401  (module fixture, reused)
from test_up_kit import UpSession, ask, client, deploy, echo_app, wait_client
from test_webhook_injection import agent_image, cli_env  # noqa: F401  (module fixtures, reused)
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, wait_until
from tests.kit.procs import alive

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PORT = 18080

# The handler: serves the intercepted port (answers name itself), and on each GET, and once at
# start (retrying while kube-proxy learns the new Service), reaches $DB_HOST:80 with a plain socket.
HANDLER = '''
import json, os, socket, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def ask_db(path):
    host = os.environ["DB_HOST"]
    s = socket.create_connection((host, 80), timeout=10)
    s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: db\\r\\nConnection: close\\r\\n\\r\\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    body = json.loads(data.partition(b"\\r\\n\\r\\n")[2])
    return {"db_host": host, "path": body["path"], "pod": body.get("pod")}

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        out = json.dumps({"source": "laptop", "db": ask_db("/through-intercept")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
error = None
for _ in range(60):
    try:
        answer = ask_db("/from-handler")
        break
    except OSError as e:
        error = str(e)
        time.sleep(1)
else:
    answer = {"error": error, "db_host": os.environ.get("DB_HOST")}
answer["pid"] = os.getpid()  # the test checks that the handler is gone once tpenv is
open(sys.argv[2], "w").write(json.dumps(answer))
server.serve_forever()
'''

PROBE = ("import os, socket, sys\n"
         "try:\n    socket.create_connection((os.environ['DB_HOST'], 80), timeout=5).close()\n"
         "except OSError as e:\n    print(e); sys.exit(1)\n")


@pytest.fixture
def wordpress(relay_manager, namespace):  # noqa: F811
    """wp (its pod says DB_HOST=db) and db in the test's namespace, and a client pod."""
    app = echo_app("wp")
    app[0]["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "DB_HOST", "value": "db"})
    apply(app, ns=namespace)
    deploy("db", namespace)
    client(namespace)
    kubectl("rollout", "status", "deployment/wp", "--timeout=180s", ns=namespace, timeout=200)
    wait_client(namespace)
    return {"ns": namespace, "db_pods": {p["metadata"]["name"]
                                         for p in kubectl_json("get", "pods", "-l", "app=db", ns=namespace)["items"]}}


def db_unreachable(lap: Laptop) -> bool:
    """The handler's own request, made from the laptop without tpenv: it must fail."""
    return lap.run(sys.executable, "-c", PROBE, env={**os.environ, "DB_HOST": "db"}).returncode != 0


def laptop_env(lap: Laptop, state: Path) -> dict[str, str]:
    return {**tpenv_env(state), "KUBECONFIG": str(lap.kubeconfig)}


def handler_gone(work: Path) -> None:
    """The handler process (its pid in its answer) no longer runs: tpenv stopped it, in every mode
    (in ns mode it runs in namespaces of its own, behind the wrapper that serves them)."""
    pid = json.loads((work / "answer.json").read_text())["pid"]
    wait_until(f"the handler (pid {pid}) gone after tpenv stopped", lambda: not alive(pid), 10)


def check_answers(work: Path, app: dict, mode: str) -> None:
    """The handler reached db by the pod's name (env mode: through its port map), and a request
    from the cluster to wp answered from the laptop, the handler again reaching db."""
    answer = wait_until("the handler's answer from db", lambda: (work / "answer.json").exists()
                        and json.loads((work / "answer.json").read_text()), 120)
    assert answer.get("path") == "/from-handler" and answer.get("pod") in app["db_pods"], answer
    if mode == "env":
        assert answer["db_host"].startswith("127.77."), answer  # the port map of db
    else:
        assert answer["db_host"] == "db", answer  # the pod's value, untouched: the capture makes it work
    through = wait_until("a request to wp answered by the laptop",
                         lambda: (lambda a: a if a and a.get("source") == "laptop" else None)(
                             ask(app["ns"], "http://wp/")), 120)
    assert through["db"]["path"] == "/through-intercept" and through["db"]["pod"] in app["db_pods"], through


@pytest.mark.parametrize("mode", ["host", "ns", "env"])
def test_intercept_connect_handler_reaches_db_by_the_pods_short_name(wordpress, laptop, tmp_path, mode):  # noqa: F811
    app, lap = wordpress, laptop
    work = tmp_path / "work"
    work.mkdir()
    (work / "handler.py").write_text(HANDLER)
    # Stage 1: from the laptop, without tpenv, db is out of reach.
    assert db_unreachable(lap)

    # Stage 2: the intercept, its command connected in this mode.
    run = Intercepting(work, "wp", "--port", f"{PORT}:web", "-n", app["ns"], "--mount", "false", "--connect", mode,
                       "--", sys.executable, str(work / "handler.py"), str(PORT), str(work / "answer.json"),
                       env=laptop_env(lap, work / "state"), prefix=lap.argv())
    try:
        desc = run.ready()
        assert desc["name"] == "wp", desc
        # Stage 3: the handler reached db by DB_HOST=db, and the intercept reaches the handler.
        check_answers(work, app, mode)
        assert any(f"mode {mode}" in line for line in run.stderr), "".join(run.stderr)
    except BaseException:
        print("tpenv intercept's stderr:\n" + "".join(run.stderr))
        print("from the laptop:", lap.run("getent", "ahostsv4", "db").stdout, lap.curl("http://db/", "-v").stderr)
        raise
    finally:
        code = run.stop()
    # Stage 4: ended by Ctrl-C as a user would; the laptop is back to reaching nothing.
    assert code in (0, 130), "".join(run.stderr)
    handler_gone(work)
    assert db_unreachable(lap)


@pytest.mark.parametrize("mode", ["host", "ns", "env"])
def test_up_connect_handler_reaches_db_by_the_pods_short_name(wordpress, laptop, tmp_path, mode):  # noqa: F811
    app, lap = wordpress, laptop
    (tmp_path / "handler.py").write_text(HANDLER)
    assert db_unreachable(lap)

    # Stage 1: tpenv up, from the laptop, with connect: in this mode and the wp intercept's handler.
    (tmp_path / "telepresence.yaml").write_text(
        f"namespace: {app['ns']}\nconnect:\n  mode: {mode}\nintercepts:\n  - workload: deployment/wp\n"
        f"    port: {PORT}:web\n    mount: false\n"
        f"    run: {{command: [{sys.executable}, handler.py, '{PORT}', answer.json], cwd: {tmp_path}, "
        f"restart: never}}\n")
    with UpSession(tmp_path, env={"KUBECONFIG": str(lap.kubeconfig)}, prefix=lap.argv()) as up:
        up.wait_ready(f"connect/{app['ns']}", "handler/wp", timeout=300)
        # Stage 2: the handler reached db by DB_HOST=db, and the intercept reaches the handler.
        try:
            check_answers(tmp_path, app, mode)
        except BaseException:
            print("tpenv up's output:\n" + up.output)
            raise
        assert up.status()["connection"]["mode"] == mode
    # Stage 3: up ended: its handler is gone, and nothing of the cluster is reachable again.
    handler_gone(tmp_path)
    assert db_unreachable(lap)
