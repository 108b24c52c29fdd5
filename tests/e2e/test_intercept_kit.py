"""Shared pieces of the intercept e2e tests (no tests here): running `tpenv` as a real process,
a local handler, a client pod, and spec comparisons.

Every tpenv process gets the agent image of this checkout (``agent_image_ref()``, imported by
`cluster up`), ``imagePullPolicy: Never`` and its own session state directory.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.cluster.images import agent_image_ref
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, live_pods
from tests.kit.apps import testapp_image

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello" / "k8s.yaml"


@functools.lru_cache(maxsize=1)
def agent_image() -> str:
    # Once per test session: the image `cluster up` imported, even if agent/ is edited meanwhile.
    return agent_image_ref()


def tpenv_env(state_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TPENV_AGENT_IMAGE=agent_image(), TPENV_AGENT_IMAGE_PULL_POLICY="Never",
               TPENV_SESSION_STATE_DIR=str(state_dir), TPENV_KUBE_ROLLOUT_TIMEOUT="120")
    return env


def tpenv(state_dir: Path, *args: str, timeout: float = 180, check: bool = True,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cp = subprocess.run([sys.executable, "-m", "tpenv.cli.main", *args], capture_output=True, text=True,
                        env={**tpenv_env(state_dir), **(env or {})}, timeout=timeout, cwd=state_dir)
    if check and cp.returncode != 0:
        pytest.fail(f"tpenv {' '.join(args)} exited {cp.returncode}\nstdout: {cp.stdout}\nstderr: {cp.stderr}",
                    pytrace=False)
    return cp


class Intercepting:
    """`tpenv intercept ARGS` as a background process; ready when it printed its block (-o json)."""

    def __init__(self, state_dir: Path, *args: str, env: dict[str, str] | None = None,
                 prefix: list[str] = ()) -> None:
        # prefix: e.g. `ip netns exec LAPTOP` (tests/e2e/laptop_kit.py)
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "tpenv.cli.main", "-o", "json", "intercept",
                                      *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**tpenv_env(state_dir), **(env or {})}, cwd=state_dir,
                                     start_new_session=True)
        self.stderr: list[str] = []
        self._err = threading.Thread(target=self._drain, daemon=True)
        self._err.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def ready(self, timeout: float = 240) -> dict:
        """The intercept's description, read from its stdout (an event: the process says so)."""
        out: list[str] = []
        result: dict = {}

        def read() -> None:
            for line in self.proc.stdout:
                out.append(line)
                try:
                    result.update(json.loads("".join(out)))
                    return
                except ValueError:
                    continue

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not result:
            self.kill()
            pytest.fail(f"tpenv intercept did not become ready (exit {self.proc.poll()}):\n{''.join(out)}\n"
                        f"{''.join(self.stderr)}", pytrace=False)
        return result

    def drained_stderr(self, timeout: float = 10) -> list[str]:
        """Its stderr lines, read to the end once the process exited (after stop or kill)."""
        self._err.join(timeout)
        return self.stderr

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


class LocalServer:
    """The developer's handler: answers every GET with ``text`` on 127.0.0.1:<port> (``port``: 0 for
    any free one, or a fixed number, e.g. replace mode's same-number ports; taken: a failure saying so)."""

    def __init__(self, text: str, port: int = 0) -> None:
        body = text.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        try:
            self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        except OSError as e:
            pytest.fail(f"127.0.0.1:{port} is taken on this machine ({e}); the test needs it free", pytrace=False)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def echo_container(port_name: str | None) -> dict:
    """The app container of the intercept scenarios: tpenv-echo on 8080, the port named or not."""
    port = {"containerPort": 8080}
    if port_name:
        port["name"] = port_name
    return {"name": "app", "image": testapp_image(), "imagePullPolicy": "Never", "command": ["tpenv-echo"],
            "ports": [port], "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}


def deploy_hello(ns: str) -> None:
    # The example names the shared :dev alias (it is run by hand); the test runs this checkout's tag.
    manifest = HELLO.read_text().replace("image: tpenv/testapp:dev", f"image: {testapp_image()}")
    assert testapp_image() in manifest, f"{HELLO} no longer names tpenv/testapp:dev: update deploy_hello"
    kubectl("apply", "-f", "-", ns=ns, input=manifest)
    kubectl("rollout", "status", "deployment/hello", "--timeout=120s", ns=ns, timeout=150)


def client_pod(ns: str, name: str = "client") -> str:
    apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {"terminationGracePeriodSeconds": 0, "containers": [
               {"name": "c", "image": testapp_image(), "imagePullPolicy": "Never",
                "command": ["sleep", "3600"]}]}}, ns=ns)
    kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=120s", ns=ns, timeout=150)
    return name


def curl(ns: str, url: str, *headers: str, pod: str = "client") -> str:
    args = ["exec", pod, "--", "curl", "-sS", "-m", "10", "--connect-timeout", "3"]
    for h in headers:
        args += ["-H", h]
    return kubectl(*args, url, ns=ns).stdout


def spec_of(kind: str, name: str, ns: str) -> dict:
    """The object's spec without fields the API server owns (for before/after comparisons)."""
    obj = kubectl_json("get", kind, name, ns=ns)
    spec = copy.deepcopy(obj["spec"])
    return spec


def agent_in_pods(ns: str, selector: str) -> list[str]:
    return [p["metadata"]["name"] for p in live_pods(ns, selector)
            if any(c["name"] == "tpenv-agent" for c in p["spec"]["containers"])]


def wait_for(what: str, fn, timeout: float = 30.0):
    """Poll a cluster-side observation (curl through a Service) until it holds: the cluster has no
    event for "the Service now answers differently", so this is the one place a poll is right."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - kept for the failure message
            last = e
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})", pytrace=False)
