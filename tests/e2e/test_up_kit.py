"""Shared pieces of the `tpenv up` e2e tests (no tests here).

- ``UpSession``: the real `tpenv up` CLI as a background process (helpers_up.TpenvProcess) with
  the agent image of this checkout and its own session state dir (test_intercept_kit.tpenv_env),
  plus `tpenv status -o json` / `tpenv down` from "another shell";
- ``write_handler``: a small local HTTP server (like examples/hello/server.py) run by ``run:``,
  answering JSON with ``source: laptop``, its name, a version string and its pid;
- ``echo_app`` / ``deploy``: a test app (``testapp_image()``) echo Deployment + Service; ``extra_namespace``;
- ``ask``: one request from the in-cluster client pod (``kubectl exec client -- curl``);
- ``ApiProxy``: a TCP proxy on 127.0.0.1 in front of the API server, and a kubeconfig using it,
  so a test can cut every connection tpenv has to the cluster, or take the API server away.
"""
from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import string
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.cluster.pytest_plugin import TEST_LABEL, apply, kubectl, live_pods, wait_until
from tests.e2e.helpers_up import TPENV, TpenvProcess, free_port
from tests.e2e.test_intercept_kit import tpenv_env
# The echo app and the handler, shared with bench/: tests/kit/apps.py.
from tests.kit.apps import HANDLER, echo_app, set_version, testapp_image, write_handler  # noqa: F401

def intercept_yaml(name: str, namespace: str, port: int, *, cwd: str, match: str | None = None,
                   ignore: tuple[str, ...] = ()) -> str:
    """One `intercepts:` item (indented for the list) with a handler run from ``cwd``."""
    lines = [f"  - name: {name}",
             f"    workload: deployment/{name}",
             f"    namespace: {namespace}",
             f"    port: {port}:web",
             f"    env: {{set: {{PORT: \"{port}\", NAME: {name}}}}}",
             "    mount: false"]
    if match:
        lines.append(f"    match: {match}")
    lines.append(f"    run: {{command: [python3, server.py], cwd: {cwd}, watch: [\"*.py\"]"
                 + (f", ignore: {json.dumps(list(ignore))}" if ignore else "") + "}")
    return "\n".join(lines) + "\n"


def deploy(name: str, ns: str, replicas: int = 1, wait: bool = True) -> None:
    apply(echo_app(name, replicas), ns=ns)
    if wait:
        kubectl("rollout", "status", f"deployment/{name}", "--timeout=120s", ns=ns, timeout=150)


def client(ns: str, name: str = "client") -> str:
    """A client pod to send requests from inside the cluster (not waited for: see wait_client)."""
    apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {"terminationGracePeriodSeconds": 0, "containers": [
               {"name": "c", "image": testapp_image(), "imagePullPolicy": "Never",
                "command": ["sleep", "3600"]}]}}, ns=ns)
    return name


def wait_client(ns: str, name: str = "client") -> None:
    kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=120s", ns=ns, timeout=150)


@contextlib.contextmanager
def extra_namespace(prefix: str):
    """A second test namespace (labelled like the fixture's), deleted afterwards without waiting."""
    suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
    name = f"t-{prefix}-{suffix}"
    apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {TEST_LABEL: "true"}}})
    wait_until(f"ServiceAccount default in {name}",
               lambda: kubectl("get", "serviceaccount", "default", ns=name, check=False).returncode == 0, 30)
    try:
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


def ask(ns: str, url: str, *headers: str, pod: str = "client", timeout: int = 5) -> dict | None:
    """One request from the client pod; the JSON answer, or None when it failed."""
    args = ["exec", pod, "--", "curl", "-sS", "-m", str(timeout)]
    for h in headers:
        args += ["-H", h]
    cp = kubectl(*args, url, ns=ns, check=False, timeout=timeout + 30)
    if cp.returncode != 0:
        return None
    try:
        return json.loads(cp.stdout)
    except ValueError:
        return None


def answered_by_laptop(ns: str, url: str, *headers: str, name: str | None = None, version: str | None = None):
    """A predicate for wait_until: the laptop's handler (of ``name``/``version`` if given) answered."""
    def check() -> dict | None:
        a = ask(ns, url, *headers)
        if a and a.get("source") == "laptop" and (name is None or a.get("name") == name) \
                and (version is None or a.get("version") == version):
            return a
        return None
    return check


def answered_by_cluster(ns: str, url: str, *headers: str):
    def check() -> dict | None:
        a = ask(ns, url, *headers)
        return a if a and a.get("source") == "cluster" else None
    return check


def ready_pods(ns: str, app: str) -> list[str]:
    return sorted(p["metadata"]["name"] for p in live_pods(ns, f"app={app}")
                  if p["status"].get("phase") == "Running"
                  and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", [])))


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class UpSession(TpenvProcess):
    """`tpenv up` in ``workdir`` (telepresence.yaml there), sessions kept in ``workdir/state``."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None, prefix: list[str] = ()) -> None:
        self.workdir = workdir
        self.state = workdir / "state"
        self.state.mkdir(exist_ok=True)
        self.env = {**tpenv_env(self.state), **(env or {})}
        super().__init__("up", *args, cwd=workdir, env=self.env, prefix=prefix)

    def tpenv(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Another shell's `tpenv ARGS` against this session (same state dir)."""
        return subprocess.run([TPENV, *args], cwd=self.workdir, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def status(self) -> dict:
        cp = self.tpenv("status", "-o", "json")
        assert cp.returncode == 0, f"tpenv status: {cp.stdout}{cp.stderr}"
        return json.loads(cp.stdout)["sessions"][0]

    def units(self) -> dict[str, dict]:
        return {u["name"]: u for u in self.status()["units"]}

    def unit(self, prefix: str) -> dict | None:
        return next((u for n, u in self.units().items() if n.startswith(prefix)), None)

    def handler_pid(self, name: str) -> int | None:
        u = self.unit(f"handler/{name}")
        m = re.fullmatch(r"pid (\d+)", (u or {}).get("detail") or "") if u and u["state"] == "ready" else None
        return int(m.group(1)) if m else None

    def all_ready(self, *prefixes: str) -> bool:
        units = self.units()
        return all(any(n.startswith(p) and u["state"] == "ready" for n, u in units.items()) for p in prefixes)

    def until(self, what: str, fn, timeout: float = 60, interval: float = 0.5):
        """wait_until, failing with the output of `tpenv up` as it is at the end of the wait."""
        try:
            return wait_until(what, fn, timeout, interval)
        except pytest.fail.Exception as e:
            pytest.fail(f"{e.msg}\n--- tpenv up output:\n{self.output}", pytrace=False)

    def wait_ready(self, *prefixes: str, timeout: float = 150) -> dict[str, dict]:
        self.assert_running()
        self.until(f"units {prefixes} ready", lambda: self.assert_running() or self.all_ready(*prefixes), timeout)
        return self.units()

    def assert_running(self) -> None:
        assert self.proc.poll() is None, f"tpenv up exited {self.proc.returncode}:\n{self.output}"

    def lines_matching(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in list(self.lines) if rx.search(line)]

    def wait_output(self, pattern: str, timeout: float = 60, count: int = 1) -> list[str]:
        return self.until(f"{count}x /{pattern}/ in the output of tpenv up",
                          lambda: (lambda m: m if len(m) >= count else None)(self.lines_matching(pattern)), timeout,
                          interval=0.1)


# -- an API server proxy -----------------------------------------------------------------------


class ApiProxy:
    """127.0.0.1:<port> -> the API server of ``kubeconfig``, with a kubeconfig copy that uses it.

    ``cut()`` closes every connection through it (port-forwards, watches) and keeps listening;
    ``stop()`` also stops listening (the API server is unreachable); ``start()`` listens again on
    the same port. The API server's certificate names 127.0.0.1, so TLS works unchanged."""

    def __init__(self, kubeconfig: Path, out: Path) -> None:
        cfg = yaml.safe_load(kubeconfig.read_text())
        ctx_name = cfg.get("current-context")
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        u = urlsplit(cluster["server"])
        self.target = (u.hostname, u.port or 443)
        assert self.target[0] in ("127.0.0.1", "localhost"), f"the API server is not on this machine: {u}"
        self.port = free_port()
        cluster["server"] = f"{u.scheme}://127.0.0.1:{self.port}"
        if "certificate-authority" in cluster:  # relative paths stay valid beside the copy
            cluster["certificate-authority"] = str((kubeconfig.parent / cluster["certificate-authority"]).resolve())
        for user in cfg.get("users") or []:
            for k in ("client-certificate", "client-key"):
                if k in (user.get("user") or {}):
                    user["user"][k] = str((kubeconfig.parent / user["user"][k]).resolve())
        self.kubeconfig = out
        out.write_text(yaml.safe_dump(cfg))
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.accepted = 0

    def start(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.2)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s: socket.socket) -> None:
        while self._listener is s:
            try:
                conn, _ = s.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            up.settimeout(None)
            conn.settimeout(None)
            if self._listener is not s:  # stopped meanwhile
                conn.close()
                up.close()
                return
            with self._lock:
                self._conns.update((conn, up))
                self.accepted += 1
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._close(s)

    def _close(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()

    def cut(self) -> int:
        """Close every open connection; returns how many there were."""
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            self._close(s)
        return len(conns) // 2

    def stop(self) -> None:
        s, self._listener = self._listener, None
        if s is not None:
            s.close()
        self.cut()

    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns) // 2
