"""The processes a run starts: the load generator (bench/load.py) in the client pod or on the host,
`tpenv intercept`, `kubectl port-forward`, and bench/server.py on loopback as the developer's handler."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.cluster_setup import kubectl, short_err, tpenv_env
from bench.common import BENCH, Unavailable
from tests.kit.kubectl import kubectl_binary

LOAD = (BENCH / "load.py").read_text()


def in_cluster(ns: str, tasks: list[dict], budget: float) -> list[dict]:
    """Run load tasks in the client pod; one result per task (a failed task carries "failed")."""
    cp = kubectl("exec", "-i", "bench-client", "--", "python3", "-", json.dumps(tasks), ns=ns, input=LOAD,
                 timeout=budget + 60, check=False)
    out = [json.loads(line) for line in cp.stdout.splitlines() if line.startswith("{")]
    if len(out) < len(tasks):
        raise Unavailable(f"load in the client pod stopped (exit {cp.returncode}): {short_err(cp.stderr)}")
    return out


def on_host(tasks: list[dict], budget: float) -> list[dict]:
    cp = subprocess.run([sys.executable, str(BENCH / "load.py"), json.dumps(tasks)], capture_output=True, text=True,
                        timeout=budget + 60)
    out = [json.loads(line) for line in cp.stdout.splitlines() if line.startswith("{")]
    if len(out) < len(tasks):
        raise Unavailable(f"host load stopped (exit {cp.returncode}): {cp.stderr.strip()[-300:]}")
    return out


def budget_of(tasks: list[dict]) -> float:
    b = 0.0
    for t in tasks:
        if t["kind"] in ("latency", "hol", "grpc"):
            b += t["n"] / t["rate"] + t.get("idle", 0) + 10
        elif t["kind"] in ("conc", "rps", "wrk", "routed"):
            b += t["seconds"] + 30
        else:
            b += t.get("bytes", 0) / 2e6 + 10  # even at 2 MB/s
    return b


class Intercept:
    """`tpenv intercept ARGS` in the background; ``ready()`` returns its description (-o json)."""

    def __init__(self, state: Path, *args: str) -> None:
        state.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.errfile = open(state / f"intercept-{int(time.time() * 1000)}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "tpenv.cli.main", "-o", "json", "intercept", *args],
                                     stdout=subprocess.PIPE, stderr=self.errfile, text=True, env=tpenv_env(state),
                                     cwd=state, start_new_session=True)

    def ready(self, timeout: float) -> dict:
        out: list[str] = []
        result: dict = {}

        def read() -> None:
            for line in self.proc.stdout:
                out.append(line)
                with contextlib.suppress(ValueError):
                    result.update(json.loads("".join(out)))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not result:
            running = self.proc.poll() is None
            self.stop()
            what = f"not ready in {timeout:.0f}s" if running else f"exited {self.proc.returncode}"
            raise Unavailable(f"tpenv intercept {what}: {self.stderr_tail()}")
        result["ready_s"] = time.monotonic() - self.t0
        return result

    def stderr_tail(self) -> str:
        """The error tpenv printed (its JSON error's message), else the last lines of its stderr."""
        self.errfile.flush()
        self.errfile.seek(0)
        text = self.errfile.read()
        at = text.rfind('"error": {')
        m = re.search(r'"message": ("(?:[^"\\]|\\.)*")', text[at:]) if at >= 0 else None
        if m:
            return json.loads(m.group(1))[:600]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return " | ".join(lines[-3:])[-600:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class PortForward:
    def __init__(self, ns: str, pod: str, port: int) -> None:
        self.proc = subprocess.Popen([kubectl_binary(), "-n", ns, "port-forward", f"pod/{pod}", f":{port}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        got: list[int] = []

        def read() -> None:
            for line in self.proc.stdout:
                m = re.search(r"127\.0\.0\.1:(\d+) ->", line)
                if m:
                    got.append(int(m.group(1)))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(30)
        if not got:
            self.stop()
            raise Unavailable(f"kubectl port-forward did not start: {short_err(self.proc.stderr.read() or '')}")
        self.port = got[0]
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class LocalServer:
    """bench/server.py on 127.0.0.1 (the developer's handler, and the loopback baseline)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "server.py"), "--host", "127.0.0.1", "--port", "0"],
                                     stdout=subprocess.PIPE, text=True, env=dict(os.environ, BENCH_SIDE="laptop"))
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()

