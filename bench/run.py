#!/usr/bin/env python3
"""tpenv benchmarks: the intercept data path next to its baselines, in one run (issues 4 and 7).

    python3 devspace.py bench [--quick | --smoke] [--out DIR] [--keep]

Every figure comes from this one run, against the cluster of $KUBECONFIG (the local one by
default), in a namespace of its own that is deleted at the end:

- the app: a Deployment running bench/server.py (from a ConfigMap) in the tpenv/testapp image,
  with two Services: ``bench-app`` (intercepted: tpenv moves its targetPort to the agent) and
  ``bench-direct`` (same pods, app port: never touched);
- in-cluster load: bench/load.py run inside a client pod (``kubectl exec -i ... python3 -``);
  host load: the same script on loopback; the developer's handler: bench/server.py on 127.0.0.1;
- tpenv: ``tpenv intercept`` as a subprocess (global with the volume mount, then a header one).

Baselines: (a) in-cluster client -> app directly, (b) ``kubectl port-forward`` from the host,
(c) loopback TCP on the host, (d) in-cluster client -> agent in passthrough -> app.

A row that cannot be measured (a tpenv feature that does not work yet, a tool missing) is
reported as "unavailable: <reason>"; the run goes on. Output: a table on stdout, and
bench/results/<time>-<mode>.json, latest-<mode>.json and a PNG chart (matplotlib, when installed).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))

from tests.cluster.pytest_plugin import kubectl_binary  # noqa: E402  (stdlib + pytest, in the venv)

LOAD = (BENCH / "load.py").read_text()
SERVER = (BENCH / "server.py").read_text()
KiB, MiB = 1024, 1024 * 1024

# What each mode does. Counts and durations bound every step; subprocess timeouts bound the rest.
MODES: dict[str, dict[str, Any]] = {
    "full": dict(lat_n=2000, lat_rate=200, idle=2.0, bulk=256 * MiB, conc_conns=200, conc_rate=1000, conc_s=30,
                 hol_n=1000, hol_rate=100, hol_bytes=64 * MiB, pt_rounds=4, pt_n=4000, pt_rate=400,
                 pt_conns=16, pt_s=12.0, pt_wrk_rounds=10, pt_wrk_s=2, pt_wrk_threads=1, pt_bulk=256 * MiB, grpc_n=1000, grpc_rate=200, mount_bytes=256 * MiB,
                 mount_files=10_000),
    "quick": dict(lat_n=500, lat_rate=250, idle=2.0, bulk=32 * MiB, conc_conns=50, conc_rate=500, conc_s=5,
                  hol_n=300, hol_rate=100, hol_bytes=16 * MiB, pt_rounds=2, pt_n=1000, pt_rate=400, pt_conns=16,
                  pt_s=4.0, pt_wrk_rounds=4, pt_wrk_s=1, pt_wrk_threads=1, pt_bulk=32 * MiB, grpc_n=300, grpc_rate=200, mount_bytes=32 * MiB, mount_files=1000),
    "smoke": dict(lat_n=60, lat_rate=200, idle=0.5, bulk=2 * MiB, conc_conns=8, conc_rate=100, conc_s=1,
                  hol_n=40, hol_rate=100, hol_bytes=2 * MiB, pt_rounds=1, pt_n=60, pt_rate=200, pt_conns=4,
                  pt_s=0.5, pt_wrk_rounds=1, pt_wrk_s=1, pt_wrk_threads=1, pt_bulk=2 * MiB, grpc_n=20, grpc_rate=100, mount_bytes=2 * MiB, mount_files=50),
}

# Every row of the report, in order: (group, key, label). The smoke test checks they are all there.
ROWS: list[tuple[str, str, str]] = [
    ("setup", "first_intercept_s", "tpenv intercept ready, agent injected on the way (s)"),
    ("setup", "intercept_s", "tpenv intercept ready, agent already there (s)"),
    ("latency", "loopback", "(c) loopback TCP on the host"),
    ("latency", "port_forward", "(b) kubectl port-forward host -> app pod"),
    ("latency", "direct", "(a) in-cluster -> app"),
    ("latency", "passthrough", "(d) in-cluster -> agent passthrough -> app"),
    ("latency", "intercept", "global intercept: in-cluster -> agent -> tunnel -> laptop"),
    ("latency", "header_matched", "header intercept HTTP/1.1, matched -> laptop"),
    ("latency", "header_unmatched", "header intercept HTTP/1.1, unmatched -> app"),
    ("grpc", "direct", "(a) gRPC in-cluster -> app"),
    ("grpc", "passthrough", "(d) gRPC via agent passthrough (per-stream h2 path)"),
    ("grpc", "header_matched", "gRPC header intercept, matched stream -> laptop"),
    ("grpc", "header_unmatched", "gRPC header intercept, unmatched stream -> app"),
    ("bulk", "loopback", "(c) loopback TCP on the host"),
    ("bulk", "port_forward", "(b) kubectl port-forward"),
    ("bulk", "direct", "(a) in-cluster -> app"),
    ("bulk", "passthrough", "(d) agent passthrough"),
    ("bulk", "intercept", "global intercept"),
    ("throughput", "direct_wrk", "(a) in-cluster -> app, closed loop, wrk"),
    ("throughput", "passthrough_wrk", "(d) agent passthrough, closed loop, wrk"),
    ("throughput", "direct", "(a) in-cluster -> app, closed loop, Python client"),
    ("throughput", "passthrough", "(d) agent passthrough, closed loop, Python client"),
    ("concurrency", "loopback", "(c) loopback TCP on the host"),
    ("concurrency", "port_forward", "(b) kubectl port-forward"),
    ("concurrency", "direct", "(a) in-cluster -> app"),
    ("concurrency", "passthrough", "(d) agent passthrough"),
    ("concurrency", "intercept", "global intercept"),
    ("hol", "port_forward", "(b) kubectl port-forward, small requests during a bulk download"),
    ("hol", "intercept", "global intercept, small requests during a bulk download"),
    ("mount", "read", "SFTP mount, sequential read"),
    ("mount", "write", "SFTP mount, sequential write"),
    ("mount", "stat", "SFTP mount, stat of every file in a directory"),
    ("resources", "client_rss_idle", "tpenv client RSS, intercept idle (MiB)"),
    ("resources", "client_rss_load", "tpenv client RSS, peak under load (MiB)"),
    ("resources", "agent_rss_idle", "agent RSS, idle (MiB)"),
    ("resources", "agent_rss_load", "agent RSS, peak under load (MiB)"),
    ("resources", "client_cpu_per_gb", "tpenv client CPU s per GB through the intercept"),
    ("resources", "agent_cpu_per_gb", "agent CPU s per GB through the intercept"),
    ("resources", "agent_cpu_per_gb_passthrough", "agent CPU s per GB in passthrough"),
    ("resources", "infra_cpu_per_gb", "API server + kubelet + containerd CPU s per GB through the intercept"),
    ("resources", "infra_cpu_per_gb_port_forward", "API server + kubelet + containerd CPU s per GB, kubectl port-forward"),
]


PHASES = ("loopback", "intercept", "passthrough", "port-forward", "header")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class Unavailable(Exception):
    """A row that cannot be measured in this run; the message says why."""


class PathLost(Unavailable):
    """Answers came from the wrong side: the intercept or the agent went away during the step."""


# ------------------------------------------------------------------------------ the cluster

def kubectl(*args: str, ns: str | None = None, input: str | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
    cmd = [kubectl_binary(), *(["-n", ns] if ns else []), *args]
    cp = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args[:3])}: {cp.stderr.strip()[-500:]}")
    return cp


def kjson(*args: str, ns: str | None = None) -> Any:
    return json.loads(kubectl(*args, "-o", "json", ns=ns).stdout)


def manifests(ns: str) -> list[dict]:
    labels = {"app": "bench-app"}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bench-server"},
         "data": {"server.py": SERVER}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "bench-app", "labels": labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {"terminationGracePeriodSeconds": 2, "containers": [{
                 "name": "app", "image": "tpenv/testapp:dev", "imagePullPolicy": "Never",
                 "command": ["python3", "/bench/server.py"],
                 "env": [{"name": "PORT", "value": "8080"}, {"name": "BENCH_SIDE", "value": "cluster"}],
                 "ports": [{"containerPort": 8080}],
                 "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                 "volumeMounts": [{"name": "server", "mountPath": "/bench", "readOnly": True},
                                  {"name": "data", "mountPath": "/data"}]}],
                 "volumes": [{"name": "server", "configMap": {"name": "bench-server"}},
                             {"name": "data", "emptyDir": {}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bench-app"},
         "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bench-direct"},
         "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bench-client"},
         "spec": {"terminationGracePeriodSeconds": 0, "activeDeadlineSeconds": 3600, "containers": [{
             "name": "c", "image": "tpenv/testapp:dev", "imagePullPolicy": "Never",
             "command": ["sleep", "3600"]}]}},
    ]


def short_err(text: str) -> str:
    """kubectl's stderr without the long URLs it quotes, last 300 characters."""
    return re.sub(r'"?https?://[^"\s]*"?', "<url>", " ".join(text.split()))[-300:]


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
        elif t["kind"] in ("conc", "rps", "wrk"):
            b += t["seconds"] + 30
        else:
            b += t.get("bytes", 0) / 2e6 + 10  # even at 2 MB/s
    return b


# ------------------------------------------------------------------------------ processes

def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a host process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


class Procs:
    """A set of host pids sampled together (sums)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def sample(self) -> tuple[float, int]:
        cpu, rss = 0.0, 0
        for p in self.pids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                c, r = proc_stat(p)
                cpu += c
                rss += r
        return cpu, rss


def container_pids(ns: str, pod: str, container: str) -> list[int]:
    """Host pids of a container of a pod on this machine (the local cluster): by container id in cgroups."""
    p = kjson("get", "pod", pod, ns=ns)
    cid = next((s.get("containerID", "") for s in p["status"].get("containerStatuses", []) if s["name"] == container), "")
    cid = cid.split("://")[-1]
    if not cid:
        return []
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                if cid in Path(f"/proc/{d}/cgroup").read_text():
                    pids.append(int(d))
    return pids


def cgroup_cpu_file(pid: int) -> Path | None:
    """The file holding the CPU time of ``pid``'s cgroup: every process of its container, those
    started later by `kubectl exec` too (cgroup v1 cpuacct.usage in ns, or v2 cpu.stat)."""
    v2 = None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpuacct" in controllers.split(","):
                for root in ("/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup/cpu,cpuacct"):
                    f = Path(root + path) / "cpuacct.usage"
                    if f.exists():
                        return f
            if controllers == "":
                v2 = path
    if v2 is not None:
        for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
            f = Path(root + v2) / "cpu.stat"
            if f.exists():
                return f
    return None


class MachineCpu:
    """The whole machine's CPU seconds from /proc/stat: busy (every core, every process, and the
    kernel's softirq work, which cgroups do not charge to a container), softirq alone, and steal
    (time the hypervisor gave to other guests)."""

    def sample(self) -> dict[str, float]:
        f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[:8])
        hz = os.sysconf("SC_CLK_TCK")
        return {"machine": (user + nice + system + irq + softirq + steal) / hz, "softirq": softirq / hz,
                "steal": steal / hz}


class ContainerCpu:
    """CPU seconds of one container, from its cgroup (containers of the local cluster only)."""

    def __init__(self, ns: str, pod: str, container: str) -> None:
        pids = container_pids(ns, pod, container)
        f = next((cf for cf in map(cgroup_cpu_file, pids) if cf is not None), None)
        if f is None:
            raise Unavailable(f"no cgroup CPU figures for {pod}/{container} on this host")
        self.file = f

    def sample(self) -> float:
        text = self.file.read_text()
        if self.file.name == "cpuacct.usage":
            return int(text) / 1e9
        return int(dict(ln.split() for ln in text.splitlines())["usage_usec"]) / 1e6


def infra_pids() -> list[int]:
    pids = []
    state = Path(os.environ.get("TPENV_CACHE", Path.home() / ".cache" / "tpenv")) / "cluster" / "pids"
    for name in ("kube-apiserver", "kubelet", "containerd"):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int((state / f"{name}.pid").read_text().split()[0]))
    return pids


class PeakRss:
    """Peak RSS of some Procs while the block runs (sampled every 0.2 s)."""

    def __init__(self, procs: Procs) -> None:
        self.procs, self.peak, self._stop = procs, 0, threading.Event()

    def __enter__(self) -> "PeakRss":
        def loop() -> None:
            while not self._stop.wait(0.2):
                self.peak = max(self.peak, self.procs.sample()[1])

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.procs.sample()[1])


def local_cluster() -> bool:
    import cli as cluster_cli  # tests/cluster/cli.py (on sys.path through the pytest plugin's import)

    return os.path.realpath(os.environ.get("KUBECONFIG", "")) == os.path.realpath(cluster_cli.kubeconfig_path())


def agent_image() -> str | None:
    """$TPENV_AGENT_IMAGE, else on the local cluster the image of this checkout's agent code, built and
    imported now when missing (cached layers: about a second); None: tpenv's default."""
    if os.environ.get("TPENV_AGENT_IMAGE"):
        return os.environ["TPENV_AGENT_IMAGE"]
    if not local_cluster():
        return None
    from tests.cluster.images import agent_image_ref

    cp = subprocess.run([sys.executable, str(REPO / "tests" / "cluster" / "cli.py"), "images"], capture_output=True,
                        text=True, timeout=900)
    if cp.returncode != 0:
        log(f"building the images failed (exit {cp.returncode}): {cp.stderr.strip()[-300:]}")
    return agent_image_ref()


AGENT_IMAGE: str | None = None


def tpenv_env(state: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TPENV_AGENT_IMAGE_PULL_POLICY", "Never")
    if AGENT_IMAGE:
        env["TPENV_AGENT_IMAGE"] = AGENT_IMAGE
    env.update(TPENV_SESSION_STATE_DIR=str(state), TPENV_KUBE_ROLLOUT_TIMEOUT="120")
    return env


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


class Profile:
    """py-spy (PyPI) sampling host pids while a step runs: collapsed stacks + a top-functions summary."""

    def __init__(self, out: Path | None, name: str, pids: dict[str, list[int]]) -> None:
        self.out, self.name, self.pids, self.procs = out, name, pids, []

    def __enter__(self) -> "Profile":
        spy = Path(sys.executable).parent / "py-spy"
        if self.out is None or not spy.exists():
            return self
        for who, pids in self.pids.items():
            for pid in pids[:1]:
                f = self.out / f"{self.name}-{who}.txt"
                self.procs.append((who, f, subprocess.Popen(
                    [str(spy), "record", "-p", str(pid), "-r", "250", "-f", "raw", "-o", str(f), "--nonblocking",
                     "-d", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        time.sleep(0.5)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self.t0 if self.procs else 0.0
        for _, _, p in self.procs:
            p.send_signal(signal.SIGINT)
        for _, _, p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()

    def summaries(self) -> dict[str, dict]:
        return {who: top_functions(f, self.seconds) for who, f, _ in self.procs if f.exists()}


# Leaf frames of a thread that waits (py-spy does not always see idleness inside a container).
IDLE_LEAVE = re.compile(r"^(\w+\.)?(select|_worker|wait|get|sleep) \((.*/)?(selectors|thread|threading|queue)\.py:")


def top_functions(path: Path, seconds: float = 0.0, rate: int = 250, n: int = 12) -> dict:
    """From py-spy's collapsed stacks (waiting threads left out): the share of busy samples each function
    had on top of the stack (self) and anywhere in it (total); busy = busy samples / (seconds x rate)."""
    self_c: dict[str, int] = {}
    total_c: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if IDLE_LEAVE.match(stack.rsplit(";", 1)[-1]):
            continue
        c = int(count)
        samples += c
        frames = [re.sub(r" \((.*/)?([^/]+)\)", r" (\2)", f) for f in stack.split(";")]
        self_c[frames[-1]] = self_c.get(frames[-1], 0) + c
        for f in set(frames):
            total_c[f] = total_c.get(f, 0) + c

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(v / max(samples, 1), 3)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]

    return {"samples": samples, "busy": round(samples / (seconds * rate), 3) if seconds else None,
            "self": top(self_c), "total": top(total_c), "file": str(path)}


# ------------------------------------------------------------------------------ mount

MOUNT_SCRIPT = r"""
import json, os, sys, time
root, size, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
t = time.perf_counter(); n = 0
with open(os.path.join(root, "big"), "rb", buffering=0) as f:
    while True:
        b = f.read(1 << 20)
        if not b: break
        n += len(b)
out["read"] = {"bytes": n, "seconds": time.perf_counter() - t}
block = os.urandom(1 << 20)
t = time.perf_counter()
with open(os.path.join(root, "written"), "wb", buffering=0) as f:
    left = size
    while left > 0:
        left -= f.write(block[:min(left, len(block))])
    os.fsync(f.fileno())
out["write"] = {"bytes": size, "seconds": time.perf_counter() - t}
t = time.perf_counter()
names = os.listdir(os.path.join(root, "many"))
for name in names:
    os.stat(os.path.join(root, "many", name))
out["stat"] = {"files": len(names), "seconds": time.perf_counter() - t}
print(json.dumps(out))
"""

PREP_SCRIPT = r"""
import os, sys
size, files = int(sys.argv[1]), int(sys.argv[2])
block = os.urandom(1 << 20)
with open("/data/big", "wb") as f:
    left = size
    while left > 0:
        left -= f.write(block[:min(left, len(block))])
os.makedirs("/data/many", exist_ok=True)
for i in range(files):
    with open(f"/data/many/f{i:05d}", "wb") as f:
        f.write(b"x" * 100)
print("ok")
"""


# ------------------------------------------------------------------------------ the run

class Bench:
    def __init__(self, mode: str, out_dir: Path, keep: bool, profile: Path | None = None,
                 only: set[str] | None = None) -> None:
        self.only = set(only or PHASES)
        self.mode, self.m, self.out_dir, self.keep = mode, MODES[mode], out_dir, keep
        self.profile_dir = profile
        self.profiles: dict[str, dict] = {}
        self.ns = "tpenv-bench-" + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        self.rows: dict[tuple[str, str], Any] = {}
        self.notes: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="tpenv-bench-"))
        self.server: LocalServer | None = None
        self.ic: Intercept | None = None
        self.app_ip = self.direct_ip = ""
        self.agent_procs: Procs | None = None
        self.agent_loop: str | None = None
        self.started = time.monotonic()

    # -- rows
    def put(self, group: str, key: str, value: Any) -> None:
        self.rows[(group, key)] = value

    def unavailable(self, keys: list[tuple[str, str]], reason: str) -> None:
        reason = " ".join(str(reason).split())[:400]
        for k in keys:
            self.rows.setdefault(k, f"unavailable: {reason}")

    def step(self, what: str, keys: list[tuple[str, str]], fn: Callable[[], None],
             again: Callable[[], None] | None = None) -> bool:
        """Run one measurement step; on failure its rows say why, and the run goes on. When the path was
        lost during the step (PathLost) and ``again`` is given: ``again()`` restores it, the step runs once more."""
        log(f"{what} ({time.monotonic() - self.started:.0f}s)")
        try:
            try:
                fn()
            except PathLost as e:
                if again is None:
                    raise
                log(f"  {what}: {e}; again")
                again()
                fn()
            for k in keys:  # a step that silently skipped a row
                self.rows.setdefault(k, "unavailable: not measured (see notes)")
            return True
        except Unavailable as e:
            self.unavailable(keys, str(e))
        except Exception as e:  # noqa: BLE001 - a bench bug or a broken feature: report and go on
            self.unavailable(keys, f"{type(e).__name__}: {e}")
        log(f"  {what}: unavailable")
        return False

    def lat(self, label: str, host: str, port: int, *, headers: dict | None = None, raw: bool = False,
            n: int | None = None, idle: bool = True) -> dict:
        return {"kind": "latency", "label": label, "host": host, "port": port, "n": n or self.m["lat_n"],
                "rate": self.m["lat_rate"], "size": KiB, "idle": self.m["idle"] if idle else 0,
                "headers": headers or {}, "raw": raw}

    def bulk(self, label: str, host: str, port: int, direction: str, size: int | None = None) -> dict:
        return {"kind": "bulk", "label": label, "host": host, "port": port, "dir": direction,
                "bytes": size or self.m["bulk"]}

    def conc(self, label: str, host: str, port: int) -> dict:
        return {"kind": "conc", "label": label, "host": host, "port": port, "conns": self.m["conc_conns"],
                "rate": self.m["conc_rate"], "seconds": self.m["conc_s"], "size": KiB}

    def hol(self, label: str, host: str, port: int) -> dict:
        return {"kind": "hol", "label": label, "host": host, "port": port, "n": self.m["hol_n"],
                "rate": self.m["hol_rate"], "bytes": self.m["hol_bytes"], "size": KiB}

    def grpc(self, label: str, host: str, port: int, headers: dict | None = None) -> dict:
        return {"kind": "grpc", "label": label, "host": host, "port": port, "n": self.m["grpc_n"],
                "rate": self.m["grpc_rate"], "headers": headers or {}}

    @contextlib.contextmanager
    def profile(self, name: str, pids: dict[str, list[int]]):
        prof = Profile(self.profile_dir, name, pids)
        with prof:
            yield
        for who, summary in prof.summaries().items():
            self.profiles[f"{name}/{who}"] = summary

    @staticmethod
    def checked(r: dict, by: str | None = None) -> dict:
        """The task's result; Unavailable when it failed or (``by``) when not every answer came from there."""
        if "failed" in r:
            raise Unavailable(r["failed"])
        if r.get("kind") in ("latency", "grpc", "hol") and r.get("errors", 0) > 0.05 * max(r.get("n", 0), 1):
            raise Unavailable(f"{r['errors']} of {r['n']} requests failed (the path broke during the step): "
                              f"{'; '.join(r.get('error_samples', [])[:2])}")
        if by is not None:
            sides = r.get("answered_by") or {}
            if set(sides) != {by}:
                raise PathLost(f"answers should all come from the {by}, came from {sides}: the path changed "
                                  "during the step (intercept lost?)")
        return r

    def cluster(self, tasks: list[dict]) -> list[dict]:
        return in_cluster(self.ns, tasks, budget_of(tasks))

    def host(self, tasks: list[dict]) -> list[dict]:
        return on_host(tasks, budget_of(tasks))

    # -- phases
    def setup(self) -> None:
        log(f"namespace {self.ns}, mode {self.mode}")
        kubectl("create", "namespace", self.ns)
        kubectl("label", "namespace", self.ns, "tpenv.io/bench=true", check=False)
        kubectl("apply", "-f", "-", ns=self.ns, input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                   "items": manifests(self.ns)}))
        self.server = LocalServer()
        global AGENT_IMAGE
        AGENT_IMAGE = agent_image()
        log(f"agent image {AGENT_IMAGE or '(tpenv default)'}")
        kubectl("rollout", "status", "deployment/bench-app", "--timeout=120s", ns=self.ns, timeout=150)
        kubectl("wait", "--for=condition=Ready", "pod/bench-client", "--timeout=120s", ns=self.ns, timeout=150)
        self.app_ip = kjson("get", "service", "bench-app", ns=self.ns)["spec"]["clusterIP"]
        self.direct_ip = kjson("get", "service", "bench-direct", ns=self.ns)["spec"]["clusterIP"]

    def app_pod(self) -> str:
        pods = kjson("get", "pods", "-l", "app=bench-app", ns=self.ns)["items"]
        ready = [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")
                 and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]
        if not ready:
            raise Unavailable("no ready bench-app pod")
        return ready[0]

    def agent_missing(self) -> str | None:
        """Why bench-app's traffic does not go through an agent, or None when it does."""
        svc = kjson("get", "service", "bench-app", ns=self.ns)
        tp = str(svc["spec"]["ports"][0].get("targetPort"))
        try:
            pod = kjson("get", "pod", self.app_pod(), ns=self.ns)
        except Unavailable as e:
            return str(e)
        if not tp.startswith("tpenv-") or not any(c["name"] == "tpenv-agent" for c in pod["spec"]["containers"]):
            return f"no agent in the app pod (the first tpenv intercept did not inject it; Service targetPort {tp})"
        return None

    def phase_loopback(self) -> None:
        assert self.server
        p = self.server.port
        keys = [("latency", "loopback"), ("bulk", "loopback"), ("concurrency", "loopback")]

        def run() -> None:
            r = self.host([self.lat("lat", "127.0.0.1", p), self.bulk("down", "127.0.0.1", p, "down"),
                           self.bulk("up", "127.0.0.1", p, "up"), self.conc("conc", "127.0.0.1", p)])
            self.put("latency", "loopback", self.checked(r[0]))
            self.put("bulk", "loopback", bulk_row(r[1], r[2]))
            self.put("concurrency", "loopback", self.checked(r[3]))

        self.step("(c) loopback", keys, run)

    def start_intercept(self, key: str, *args: str) -> Intercept:
        assert self.server
        ic = Intercept(self.tmp / "state", "bench-app", "--port", f"{self.server.port}:80", "--service", "bench-app",
                       "-n", self.ns, *args)
        try:
            info = ic.ready(240)
        except Unavailable:
            raise
        self.put("setup", key, {"seconds": info["ready_s"]})
        ic.info = info  # type: ignore[attr-defined]
        return ic

    def inject_only(self, key: str = "first_intercept_s") -> None:
        """The agent put in by the real machinery, the first `tpenv intercept`, left at once (passthrough)."""
        log("injecting the agent with a tpenv intercept, then leaving")
        try:
            ic = self.start_intercept(key, "--mount", "false")
            ic.stop()
            pod = self.app_pod()
            apids = container_pids(self.ns, pod, "tpenv-agent")
            self.agent_procs = Procs(apids) if apids else None
        except Exception as e:  # noqa: BLE001 - phase_passthrough then says there is no agent
            self.unavailable([("setup", key)], f"tpenv intercept: {e}")

    def phase_intercept(self) -> None:
        ikeys = [("latency", "intercept"), ("bulk", "intercept"), ("concurrency", "intercept"), ("hol", "intercept"),
                 ("resources", "client_rss_idle"), ("resources", "client_rss_load"), ("resources", "agent_rss_idle"),
                 ("resources", "agent_rss_load"), ("resources", "client_cpu_per_gb"),
                 ("resources", "agent_cpu_per_gb"), ("resources", "infra_cpu_per_gb")]
        mkeys = [("mount", "read"), ("mount", "write"), ("mount", "stat")]
        mnt = self.tmp / "mnt"
        mnt.mkdir()
        st: dict[str, Any] = {}

        def establish(key: str) -> None:
            """(Re)start the global intercept; the pids and pod it serves."""
            if self.ic is not None:
                self.ic.stop()
            self.ic = self.start_intercept(key, "--mount", str(mnt))
            st["ic"] = self.ic
            st["pod"] = self.app_pod()
            st["client"] = Procs([self.ic.proc.pid])
            apids = container_pids(self.ns, st["pod"], "tpenv-agent")
            self.agent_procs = Procs(apids) if apids else None
            st["who"] = {"client": [self.ic.proc.pid], "agent": apids}

        def again() -> None:
            self.notes.append("the intercept was lost during a step (another session's `tpenv uninstall "
                              "--everything` removes every agent of the cluster); re-established, step run again")
            establish("reestablish_s")

        log("global intercept (first run: injects the agent)")
        try:
            establish("first_intercept_s")
        except Exception as e:  # noqa: BLE001
            self.unavailable([("setup", "first_intercept_s"), *ikeys, *mkeys], f"tpenv intercept: {e}")
            return
        try:
            infra = Procs(infra_pids())
            ip, port = self.app_ip, 80

            def idle_rss() -> None:
                time.sleep(1.0)
                self.put("resources", "client_rss_idle", {"MiB": st["client"].sample()[1] / MiB})
                if self.agent_procs:
                    self.put("resources", "agent_rss_idle", {"MiB": self.agent_procs.sample()[1] / MiB})
                else:
                    raise Unavailable("agent process not found on this host (not the local cluster?)")

            self.step("intercept: idle RSS", [("resources", "client_rss_idle"), ("resources", "agent_rss_idle")],
                      idle_rss)

            def latency() -> None:
                self.put("latency", "intercept", self.checked(self.cluster([self.lat("lat", ip, port)])[0], "laptop"))

            self.step("intercept: latency", [("latency", "intercept")], latency, again)

            def bulk() -> None:
                agent = self.agent_procs or Procs([])
                c0, a0, i0 = st["client"].sample()[0], agent.sample()[0], infra.sample()[0]
                with self.profile("intercept-bulk", st["who"]):
                    r = self.cluster([self.bulk("down", ip, port, "down"), self.bulk("up", ip, port, "up")])
                c1, a1, i1 = st["client"].sample()[0], agent.sample()[0], infra.sample()[0]
                self.put("bulk", "intercept", bulk_row(self.checked(r[0], "laptop"), self.checked(r[1], "laptop")))
                gb = 2 * self.m["bulk"] / 1e9
                self.put("resources", "client_cpu_per_gb", {"cpu_s_per_GB": (c1 - c0) / gb})
                if self.agent_procs:
                    self.put("resources", "agent_cpu_per_gb", {"cpu_s_per_GB": (a1 - a0) / gb})
                self.put("resources", "infra_cpu_per_gb", {"cpu_s_per_GB": (i1 - i0) / gb, "pids": infra.pids})

            self.step("intercept: bulk", [("bulk", "intercept"), ("resources", "client_cpu_per_gb"),
                                          ("resources", "agent_cpu_per_gb"), ("resources", "infra_cpu_per_gb")],
                      bulk, again)

            def conc() -> None:
                with PeakRss(st["client"]) as cp, PeakRss(self.agent_procs or Procs([])) as ap, \
                        self.profile("intercept-concurrency", st["who"]):
                    r = self.checked(self.cluster([self.conc("conc", ip, port)])[0], "laptop")
                self.put("concurrency", "intercept", r)
                self.put("resources", "client_rss_load", {"MiB": cp.peak / MiB})
                if self.agent_procs and ap.peak:
                    self.put("resources", "agent_rss_load", {"MiB": ap.peak / MiB})

            self.step("intercept: concurrency", [("concurrency", "intercept"), ("resources", "client_rss_load"),
                                                 ("resources", "agent_rss_load")], conc, again)
            self.step("intercept: head-of-line", [("hol", "intercept")],
                      lambda: self.put("hol", "intercept",
                                       self.checked(self.cluster([self.hol("hol", ip, port)])[0], "laptop")), again)
            self.step("intercept: mount", mkeys, lambda: self.mount(st["ic"], st["pod"]), again)
        finally:
            if self.ic is not None:
                self.ic.stop()
            self.ic = None

    def mount(self, ic: Intercept, pod: str) -> None:
        point = ic.info.get("mount_point")  # type: ignore[attr-defined]
        if not point:
            raise Unavailable(f"the intercept reported no mount point ({ic.stderr_tail()[-200:]})")
        size, files = self.m["mount_bytes"], self.m["mount_files"]
        kubectl("exec", "-i", pod, "-c", "app", "--", "python3", "-", str(size), str(files), ns=self.ns,
                input=PREP_SCRIPT, timeout=120 + size / 20e6)
        root = Path(point) / "data"
        cp = subprocess.run([sys.executable, "-c", MOUNT_SCRIPT, str(root), str(size), str(files)],
                            capture_output=True, text=True, timeout=120 + 2 * size / 1e6)
        if cp.returncode != 0:
            raise Unavailable(f"mount I/O failed: {cp.stderr.strip()[-300:]}")
        r = json.loads(cp.stdout)
        self.put("mount", "read", {"MBps": r["read"]["bytes"] / r["read"]["seconds"] / 1e6, **r["read"]})
        self.put("mount", "write", {"MBps": r["write"]["bytes"] / r["write"]["seconds"] / 1e6, **r["write"]})
        self.put("mount", "stat", {**r["stat"], "us_per_file": r["stat"]["seconds"] / max(r["stat"]["files"], 1) * 1e6})

    def phase_passthrough(self) -> None:
        """Issue 4: the same requests to the app directly and through the agent, interleaved in rounds."""
        keys = [("latency", "direct"), ("latency", "passthrough"), ("throughput", "direct_wrk"),
                ("throughput", "passthrough_wrk"), ("throughput", "direct"), ("throughput", "passthrough"),
                ("bulk", "direct"), ("bulk", "passthrough")]
        targets = {"direct": self.direct_ip, "passthrough": self.app_ip}
        why = self.agent_missing()
        if why and isinstance(self.rows.get(("setup", "first_intercept_s")), dict):
            self.notes.append(f"the agent was gone before the passthrough phase ({why}: another session's "
                              "`tpenv uninstall --everything`?); injected again")
            self.inject_only("reinject_s")
            why = self.agent_missing()
        if not why:
            apids = container_pids(self.ns, self.app_pod(), "tpenv-agent")
            self.agent_procs = Procs(apids) if apids else None
            # Which event loop the agent runs (uvloop, or asyncio's with the reason): it moves the figures.
            logs = kubectl("logs", self.app_pod(), "-c", "tpenv-agent", ns=self.ns, check=False).stdout
            line = next((ln for ln in logs.splitlines() if "event loop:" in ln), None)
            self.agent_loop = json.loads(line)["msg"].split("event loop:", 1)[1].strip() if line else "unknown"
        pod0 = self.app_pod() if not why else ""

        def same_agent() -> None:
            """Passthrough answers come from the app either way: check the agent stayed for the whole step."""
            gone = self.agent_missing()
            if gone or self.app_pod() != pod0:
                raise PathLost(f"the agent or its pod changed during the step ({gone or 'new pod'})")

        def again() -> None:
            nonlocal pod0
            self.notes.append("the agent went away during a passthrough step; injected again, step run again")
            self.inject_only("reinject_s")
            pod0 = self.app_pod()

        if why:
            self.unavailable([*keys, ("resources", "agent_cpu_per_gb_passthrough"), ("concurrency", "passthrough"),
                              ("grpc", "passthrough")], why)

        def cpu_meters() -> dict[str, ContainerCpu]:
            """CPU of the app's and the agent's containers (the load generator reports its own)."""
            pod = self.app_pod()
            return {"app": ContainerCpu(self.ns, pod, "app"), "agent": ContainerCpu(self.ns, pod, "tpenv-agent")}

        machine = MachineCpu()

        def closed_loop(task: dict, meters: dict[str, ContainerCpu] | None) -> dict:
            """One closed-loop task in its own exec, with the CPU each container spent meanwhile
            (and the whole machine's: other sessions' work and the kernel's softirq are in it)."""
            c0 = {k: m.sample() for k, m in (meters or {}).items()}
            m0, t0 = machine.sample(), time.monotonic()
            r = self.checked(self.cluster([task])[0])
            m1, t1 = machine.sample(), time.monotonic()
            cpu = {k: m.sample() - c0[k] for k, m in (meters or {}).items()}
            # The load generator's own CPU comes from the task (the wrk child, or the Python loop),
            # not from the client container, whose figure would count the exec's start-up too.
            cpu["load"] = r["cpu_s"]
            r["cpu"] = cpu
            # The machine's, as cores busy on average over the whole exec (its start-up included).
            r["machine_cores"] = {k: (m1[k] - m0[k]) / (t1 - t0) for k in m0}
            return r

        def throughput_row(rs: list[dict]) -> dict:
            reqs = sum(r["requests"] for r in rs)
            row = {"rps": statistics.fmean(r["rps"] for r in rs), "errors": sum(r["errors"] for r in rs),
                   "conns": rs[0]["conns"], "requests": reqs, "rounds_rps": [round(r["rps"]) for r in rs],
                   "p50_ms": statistics.fmean(r["p50_ms"] for r in rs), "p99_ms": max(r["p99_ms"] for r in rs)}
            if all(r.get("cpu") for r in rs) and reqs:
                row["cpu_us_per_req"] = {k: sum(r["cpu"][k] for r in rs) / reqs * 1e6 for k in rs[0]["cpu"]}
                busy = sum(r["seconds"] for r in rs)
                row["cpu_cores"] = {k: sum(r["cpu"][k] for r in rs) / busy for k in rs[0]["cpu"]}
            row["machine_cores"] = {k: statistics.fmean(r["machine_cores"][k] for r in rs) for k in rs[0]["machine_cores"]}
            return row

        def run() -> None:
            if why:
                raise Unavailable(why)
            try:
                meters: dict[str, ContainerCpu] | None = cpu_meters()
            except Unavailable as e:
                meters = None
                self.notes.append(f"passthrough: no CPU per request ({e})")
            rounds = self.m["pt_rounds"]
            lat: dict[str, list[dict]] = {k: [] for k in targets}
            rps: dict[str, list[dict]] = {k: [] for k in targets}
            wrk: dict[str, list[dict]] = {k: [] for k in targets}
            wrk_failed: list[str] = []
            bulks: dict[str, list[dict]] = {k: [] for k in targets}
            # wrk's closed loop: short runs, one exec each (CPU measured around it), the sides alternating
            # (direct, agent, agent, direct, ...) so that both see the same background load.
            with self.profile("passthrough-wrk", {"agent": self.agent_procs.pids if self.agent_procs else []}):
                for i in range(self.m["pt_wrk_rounds"]):
                    order = list(targets.items()) if i % 2 == 0 else list(reversed(targets.items()))
                    for k, ip in order:
                        if wrk_failed:
                            break
                        try:
                            wrk[k].append(closed_loop({"kind": "wrk", "label": f"wrk:{k}", "host": ip, "port": 80,
                                                       "conns": self.m["pt_conns"], "threads": self.m["pt_wrk_threads"],
                                                       "seconds": self.m["pt_wrk_s"], "size": KiB}, meters))
                        except Unavailable as e:  # wrk missing or broken: the other rows still stand
                            if isinstance(e, PathLost):
                                raise
                            wrk_failed.append(str(e))
            for i in range(rounds):
                order = list(targets.items()) if i % 2 == 0 else list(reversed(targets.items()))
                tasks = []
                with self.profile(f"passthrough-round{i}", {"agent": self.agent_procs.pids if self.agent_procs else []}):
                    # The Python closed loop one exec per side (CPU measured around it), then the rest.
                    for k, ip in order:
                        rps[k].append(closed_loop({"kind": "rps", "label": f"rps:{k}", "host": ip, "port": 80,
                                                   "conns": self.m["pt_conns"], "seconds": self.m["pt_s"] / rounds,
                                                   "size": KiB}, meters))
                    for k, ip in order:
                        t = self.lat(f"lat:{k}", ip, 80, raw=True, n=self.m["pt_n"] // rounds, idle=(i == 0))
                        t["rate"] = self.m["pt_rate"]
                        tasks.append(t)
                        tasks.append(self.bulk(f"bulk-down:{k}", ip, 80, "down", self.m["pt_bulk"] // rounds))
                        tasks.append(self.bulk(f"bulk-up:{k}", ip, 80, "up", self.m["pt_bulk"] // rounds))
                    results = self.cluster(tasks)
                for r in results:
                    kind, k = r["label"].split(":")
                    self.checked(r, None if kind == "rps" else "cluster")
                    {"lat": lat, "rps": rps}.get(kind, bulks)[k].append(r)
            for k in targets:
                samples = [x for r in lat[k] for x in r.pop("samples_ms")]
                side = {}
                for r in lat[k]:
                    for s, n in r.get("answered_by", {}).items():
                        side[s] = side.get(s, 0) + n
                self.put("latency", k, {"n": len(samples), "errors": sum(r["errors"] for r in lat[k]),
                                        "p50_ms": pctl(samples, 50), "p90_ms": pctl(samples, 90),
                                        "p99_ms": pctl(samples, 99), "max_ms": max(samples),
                                        "mean_ms": statistics.fmean(samples), "idle_ms": lat[k][0].get("idle_ms"),
                                        "rate_target": self.m["pt_rate"], "rounds": rounds, "answered_by": side})
                if wrk_failed:
                    self.put("throughput", f"{k}_wrk", f"unavailable: wrk: {wrk_failed[0]}")
                else:
                    self.put("throughput", f"{k}_wrk", {**throughput_row(wrk[k]), "client": "wrk",
                                                        "threads": self.m["pt_wrk_threads"]})
                self.put("throughput", k, {**throughput_row(rps[k]), "client": "python"})
                down = [r for r in bulks[k] if r["dir"] == "down"]
                up = [r for r in bulks[k] if r["dir"] == "up"]
                self.put("bulk", k, {"down_MBps": sum(r["bytes"] for r in down) / sum(r["seconds"] for r in down) / 1e6,
                                     "up_MBps": sum(r["bytes"] for r in up) / sum(r["seconds"] for r in up) / 1e6,
                                     "bytes": self.m["pt_bulk"]})
            same_agent()

        self.step("(a)/(d) direct vs agent passthrough, interleaved", keys, run, again)

        def cpu() -> None:
            apids = container_pids(self.ns, self.app_pod(), "tpenv-agent")
            if not apids:
                raise Unavailable("agent process not found on this host")
            procs = Procs(apids)
            a0 = procs.sample()[0]
            r = self.cluster([self.bulk("down", self.app_ip, 80, "down"), self.bulk("up", self.app_ip, 80, "up")])
            a1 = procs.sample()[0]
            for x in r:
                self.checked(x, "cluster")
            same_agent()
            row = {"cpu_s_per_GB": (a1 - a0) / (2 * self.m["bulk"] / 1e9)}
            if a1 == a0:
                row["note"] = "below the clock tick for this transfer size"
            self.put("resources", "agent_cpu_per_gb_passthrough", row)

        self.step("agent CPU per GB in passthrough", [("resources", "agent_cpu_per_gb_passthrough")], cpu)

        def conc_grpc() -> None:
            r = self.cluster([self.conc("conc:direct", self.direct_ip, 80), self.conc("conc:pt", self.app_ip, 80),
                              self.grpc("grpc:direct", self.direct_ip, 80), self.grpc("grpc:pt", self.app_ip, 80)])
            for (g, k), x in zip([("concurrency", "direct"), ("concurrency", "passthrough"), ("grpc", "direct"),
                                  ("grpc", "passthrough")], r):
                self.put(g, k, x if "failed" not in x else f"unavailable: {x['failed']}")
            same_agent()

        self.step("concurrency and gRPC, direct and passthrough",
                  [("concurrency", "direct"), ("concurrency", "passthrough"), ("grpc", "direct"), ("grpc", "passthrough")],
                  conc_grpc, again)

    def phase_port_forward(self) -> None:
        keys = [("latency", "port_forward"), ("bulk", "port_forward"), ("concurrency", "port_forward"),
                ("hol", "port_forward"), ("resources", "infra_cpu_per_gb_port_forward")]

        def run() -> None:
            pf = PortForward(self.ns, self.app_pod(), 8080)
            try:
                p = pf.port
                infra = Procs(infra_pids() + [pf.proc.pid])
                r = self.host([self.lat("lat", "127.0.0.1", p)])
                self.put("latency", "port_forward", self.checked(r[0]))
                i0 = infra.sample()[0]
                r = self.host([self.bulk("down", "127.0.0.1", p, "down"), self.bulk("up", "127.0.0.1", p, "up")])
                i1 = infra.sample()[0]
                self.put("bulk", "port_forward", bulk_row(r[0], r[1]))
                self.put("resources", "infra_cpu_per_gb_port_forward",
                         {"cpu_s_per_GB": (i1 - i0) / (2 * self.m["bulk"] / 1e9), "with": "kubectl port-forward"})
                r = self.host([self.conc("conc", "127.0.0.1", p), self.hol("hol", "127.0.0.1", p)])
                for key, x in ((("concurrency", "port_forward"), r[0]), (("hol", "port_forward"), r[1])):
                    try:
                        self.put(*key, self.checked(x, "cluster"))
                    except Unavailable as e:
                        self.put(*key, f"unavailable: {e}")
            finally:
                pf.stop()

        self.step("(b) kubectl port-forward", keys, run)

    def phase_header(self) -> None:
        keys = [("latency", "header_matched"), ("latency", "header_unmatched"), ("grpc", "header_matched"),
                ("grpc", "header_unmatched")]
        args = ("--name", "bench-hdr", "--mount", "false", "--http-header", "x-bench=yes")
        log("header intercept")
        try:
            self.ic = self.start_intercept("intercept_s", *args)
        except Exception as e:  # noqa: BLE001
            self.unavailable([("setup", "intercept_s"), *keys], f"tpenv intercept --http-header: {e}")
            return

        def again() -> None:
            self.notes.append("the header intercept was lost during its step (another session's `tpenv uninstall "
                              "--everything`?); re-established, step run again")
            if self.ic is not None:
                self.ic.stop()
            self.ic = self.start_intercept("reestablish_s", *args)

        try:
            def run() -> None:
                h = {"x-bench": "yes"}
                r = self.cluster([self.lat("m", self.app_ip, 80, headers=h), self.lat("u", self.app_ip, 80),
                                  self.grpc("gm", self.app_ip, 80, headers=h), self.grpc("gu", self.app_ip, 80)])
                host = platform.node()
                pod = self.app_pod()
                out: dict[tuple[str, str], Any] = {}
                # Who must have answered: HTTP/1.1 by X-Bench-Side, gRPC by tpenv-echo's "pod" (hostname).
                for key, x, want in zip(keys, r, ("laptop", "cluster", host, pod)):
                    if "failed" in x:
                        out[key] = f"unavailable: {x['failed']}"
                        continue
                    sides = x.get("answered_by") or {}
                    if set(sides) != {want} or x.get("idle_error"):
                        raise PathLost(f"{key[0]} {key[1]}: answers should all come from {want}, came from {sides}"
                                       + (f"; the request after idle failed: {x['idle_error']}"
                                          if x.get("idle_error") else ""))
                    out[key] = x
                for key, x in out.items():
                    self.put(*key, x)

            self.step("header intercept: HTTP/1.1 and gRPC, matched and not", keys, run, again)
        finally:
            if self.ic is not None:
                self.ic.stop()
            self.ic = None

    def cleanup(self) -> None:
        if self.ic is not None:
            self.ic.stop()
        if self.server is not None:
            self.server.stop()
        if not self.keep:
            # The API server may be away (another session restarting the cluster): retry for a minute.
            for _ in range(12):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    if kubectl("delete", "namespace", self.ns, "--wait=false", "--ignore-not-found", check=False,
                               timeout=30).returncode == 0:
                        break
                time.sleep(5)
            else:
                log(f"could not delete namespace {self.ns}: delete it by hand (label tpenv.io/bench=true)")
            mnt = self.tmp / "mnt"
            if not (mnt.exists() and os.path.ismount(mnt)):  # never delete through a live mount
                shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"kept namespace {self.ns}")

    def run(self) -> dict:
        load0 = os.getloadavg()
        api0 = infra_pids()
        try:
            self.setup()
            if "loopback" in self.only:
                self.phase_loopback()
            if "intercept" in self.only:
                self.phase_intercept()
            elif "passthrough" in self.only or "header" in self.only:
                self.inject_only()
            if "passthrough" in self.only:
                self.phase_passthrough()
            if "port-forward" in self.only:
                self.phase_port_forward()
            if "header" in self.only:
                self.phase_header()
        except Exception as e:  # noqa: BLE001 - setup broke: every row not measured says so
            log(f"run stopped: {type(e).__name__}: {e}")
            self.notes.append(f"run stopped: {type(e).__name__}: {e}")
            self.unavailable([(g, k) for g, k, _ in ROWS], f"the run stopped early: {type(e).__name__}: {e}")
        finally:
            self.cleanup()
        self.unavailable([(g, k) for g, k, _ in ROWS], "not measured" if self.only == set(PHASES)
                         else f"not measured (--only {','.join(sorted(self.only))})")
        if infra_pids() != api0:
            self.notes.append(f"the cluster's daemons restarted during this run (pids {api0} -> {infra_pids()}: "
                              "another session's `cluster down/up`?); rows measured around it are suspect")
        return self.report(load0)

    def report(self, load0: tuple) -> dict:
        rows = []
        for g, k, label in ROWS:
            rows.append({"group": g, "key": k, "label": label, "value": self.rows[(g, k)]})
        return {
            "mode": self.mode, "params": self.m, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": time.monotonic() - self.started, "namespace": self.ns,
            "machine": machine(), "agent_image": AGENT_IMAGE, "agent_loop": self.agent_loop,
            "loadavg_before": load0, "loadavg_after": os.getloadavg(),
            "rows": rows, "targets": targets(self.rows), "notes": self.notes,
            **({"profiles": self.profiles} if self.profiles else {}),
        }


def pctl(samples: list[float], p: float) -> float | None:
    if not samples:
        return None
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def bulk_row(down: dict, up: dict) -> dict:
    for r in (down, up):
        if "failed" in r:
            raise Unavailable(f"bulk {r.get('label')}: {r['failed']}")
    return {"down_MBps": down["MBps"], "up_MBps": up["MBps"], "bytes": down["bytes"],
            "down_s": down["seconds"], "up_s": up["seconds"]}


def machine() -> dict:
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"host": platform.node(), "cpus": os.cpu_count(), "cpu_model": cpu, "mem_GiB": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "commit": git.stdout.strip()}


def targets(rows: dict) -> list[dict]:
    """The done-when ratios of issues 4 and 7, from this run's rows."""
    def v(g: str, k: str) -> dict | None:
        x = rows.get((g, k))
        return x if isinstance(x, dict) else None

    out = []

    def check(name: str, measured: Any, target: str, ok: bool | None, why: str = "", **extra: Any) -> None:
        out.append({"target": name, "measured": measured, "wanted": target,
                    "status": "n/a" if ok is None else ("met" if ok else "missed"), **({"missing": why} if why else {}),
                    **extra})

    def per_round(a: dict, b: dict) -> dict:
        """Round by round ratios (the rounds interleave both sides, so each pair shared the machine's mood)."""
        pairs = list(zip(a.get("rounds_rps") or [], b.get("rounds_rps") or []))
        rs = [round(x / y, 3) for x, y in pairs if y]
        return {"rounds": rs, "median_round": statistics.median(rs)} if rs else {}

    ic, pf = v("latency", "intercept"), v("latency", "port_forward")
    if ic and pf:
        d50, d99 = ic["p50_ms"] - pf["p50_ms"], ic["p99_ms"] - pf["p99_ms"]
        check("intercept p50 - port-forward p50 (ms)", round(d50, 3), "<= 1", d50 <= 1)
        check("intercept p99 - port-forward p99 (ms)", round(d99, 3), "<= 5", d99 <= 5)
    else:
        check("intercept p50/p99 vs port-forward", None, "<= +1 / +5 ms", None, "a row is unavailable")
    bi, bp = v("bulk", "intercept"), v("bulk", "port_forward")
    if bi and bp:
        for d in ("down", "up"):
            r = bi[f"{d}_MBps"] / bp[f"{d}_MBps"]
            check(f"bulk {d} intercept / port-forward", round(r, 3), ">= 0.80", r >= 0.8)
    else:
        check("bulk intercept / port-forward", None, ">= 0.80", None, "a row is unavailable")
    c = v("concurrency", "intercept")
    check("errors at concurrency through the intercept", c["errors"] if c else None, "0",
          (c["errors"] == 0) if c else None, "" if c else "row unavailable")
    h = v("hol", "intercept")
    if h and ic:
        r = h["p99_ms"] / ic["p99_ms"]
        check("p99 under bulk / idle p99 (intercept)", round(r, 2), "<= 3", r <= 3)
    else:
        check("p99 under bulk / idle p99 (intercept)", None, "<= 3", None, "a row is unavailable")
    mr = v("mount", "read")
    if mr and bi:
        # mount reads move data pod -> laptop: the intercept's upload direction (caller in the pod sends)
        r = mr["MBps"] / bi["up_MBps"]
        check("mount sequential read / tunnel bulk (same direction)", round(r, 3), ">= 0.80", r >= 0.8)
    else:
        check("mount sequential read / tunnel bulk", None, ">= 0.80", None, "a row is unavailable")
    ld, lp = v("latency", "direct"), v("latency", "passthrough")
    if ld and lp:
        d = lp["p50_ms"] - ld["p50_ms"]
        check("passthrough added p50 (ms)", round(d, 3), "<= 0.3", d <= 0.3)
        check("passthrough added p99 (ms, no target)", round(lp["p99_ms"] - ld["p99_ms"], 3), "-", None)
    else:
        check("passthrough added p50 (ms)", None, "<= 0.3", None, "a row is unavailable")
    td, tp = v("throughput", "direct_wrk"), v("throughput", "passthrough_wrk")
    if td and tp:
        r = tp["rps"] / td["rps"]
        check("passthrough throughput / direct (req/s, wrk)", round(r, 3), ">= 0.85", r >= 0.85, **per_round(tp, td))
    else:
        check("passthrough throughput / direct (wrk)", None, ">= 0.85", None, "a row is unavailable")
    td, tp = v("throughput", "direct"), v("throughput", "passthrough")
    if td and tp:  # the Python client takes most of a core itself: shown, not the target's figure
        check("passthrough throughput / direct (Python client, no target)", round(tp["rps"] / td["rps"], 3), "-",
              None, **per_round(tp, td))
    bd, bpt = v("bulk", "direct"), v("bulk", "passthrough")
    if bd and bpt:
        r = min(bpt["down_MBps"] / bd["down_MBps"], bpt["up_MBps"] / bd["up_MBps"])
        check("passthrough bulk / direct (worse direction)", round(r, 3), ">= 0.85", r >= 0.85)
    return out


# ------------------------------------------------------------------------------ output

def fmt(x: Any, nd: int = 2) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def cell(group: str, v: Any) -> str:
    if not isinstance(v, dict):
        return str(v)
    if group in ("latency", "grpc", "hol"):
        s = f"p50 {fmt(v.get('p50_ms'), 3)}  p99 {fmt(v.get('p99_ms'), 3)}  max {fmt(v.get('max_ms'), 1)} ms"
        if v.get("idle_ms") is not None:
            s += f"  after idle {fmt(v['idle_ms'], 3)} ms"
        if "bulk_MBps_during" in v:
            s += f"  (bulk {fmt(v['bulk_MBps_during'], 1)} MB/s meanwhile)"
        s += f"  n={v.get('n')} err={v.get('errors')}"
        return s
    if group == "bulk":
        return f"down {fmt(v['down_MBps'], 1)} MB/s  up {fmt(v['up_MBps'], 1)} MB/s  ({v['bytes'] // MiB} MiB each way)"
    if group == "throughput":
        s = f"{fmt(v['rps'], 0)} req/s  ({v['conns']} conns, err={v['errors']}, p50 {fmt(v.get('p50_ms'), 2)} ms)"
        if v.get("cpu_us_per_req"):
            s += "  CPU us/req: " + ", ".join(f"{k} {x:.0f}" for k, x in v["cpu_us_per_req"].items())
        if v.get("machine_cores"):
            mc = v["machine_cores"]
            s += f"  machine busy {mc['machine']:.2f} cores (softirq {mc['softirq']:.2f}, steal {mc['steal']:.2f})"
        return s
    if group == "concurrency":
        return (f"{fmt(v['rps'], 0)} req/s of {v['rate_target']}  err={v['errors']}  p50 {fmt(v['p50_ms'], 2)}  "
                f"p99 {fmt(v['p99_ms'], 2)} ms  ({v['conns']} conns x {v['seconds']} s)")
    if group == "mount":
        if "MBps" in v:
            return f"{fmt(v['MBps'], 1)} MB/s  ({v['bytes'] // MiB} MiB)"
        return f"{v['files']} files in {fmt(v['seconds'], 2)} s  ({fmt(v['us_per_file'], 0)} us/file)"
    if group == "setup":
        return f"{fmt(v['seconds'], 1)} s"
    if "MiB" in v:
        return f"{fmt(v['MiB'], 1)} MiB"
    if "cpu_s_per_GB" in v:
        return f"{fmt(v['cpu_s_per_GB'], 2)} CPU s/GB"
    return json.dumps(v)


def table(res: dict) -> str:
    lines = [f"tpenv bench, mode {res['mode']}, {res['started']}, {res['duration_s']:.0f} s, "
             f"{res['machine']['cpus']} CPUs, commit {res['machine']['commit']}, "
             f"load average {res['loadavg_before'][0]:.1f} -> {res['loadavg_after'][0]:.1f}"
             + (f", agent event loop {res['agent_loop']}" if res.get("agent_loop") else "")]
    group = None
    for r in res["rows"]:
        if r["group"] != group:
            group = r["group"]
            lines.append(f"\n[{group}]")
        lines.append(f"  {r['label']:<66} {cell(r['group'], r['value'])}")
    for name, prof in res.get("profiles", {}).items():
        busy = f", busy {prof['busy']:.0%} of the step" if prof.get("busy") is not None else ""
        lines.append(f"\nprofile {name} ({prof['samples']} busy samples{busy}), most time on top of the stack:")
        for fn, share in prof["self"][:6]:
            lines.append(f"  {share:6.1%}  {fn}")
    for n in res["notes"]:
        lines.append(f"\nnote: {n}")
    lines.append("\n[targets]")
    for t in res["targets"]:
        lines.append(f"  {t['target']:<56} {fmt(t['measured'], 3):>10}  want {t['wanted']:<8} {t['status']}"
                     + (f" ({t['missing']})" if t.get("missing") else "")
                     + (f"  (by round: {', '.join(f'{x:.2f}' for x in t['rounds'])}; median {t['median_round']:.2f})"
                        if t.get("rounds") else ""))
    return "\n".join(lines)


def markdown(res: dict) -> str:
    """The table as Markdown (for docs/performance.md)."""
    m = res["machine"]
    out = [f"Run `{res['mode']}` of {res['started']} ({res['duration_s']:.0f} s), commit `{m['commit']}`, "
           f"{m['cpus']} CPUs ({m['cpu_model']}), {m['mem_GiB']} GiB, Linux {m['kernel']}, Python {m['python']}; "
           f"load average {res['loadavg_before'][0]:.1f} -> {res['loadavg_after'][0]:.1f}.", ""]
    group = None
    for r in res["rows"]:
        if r["group"] != group:
            group = r["group"]
            out += ["", f"**{group}**", "", "| path | figure |", "|---|---|"]
        out.append(f"| {r['label']} | {cell(r['group'], r['value']).replace('|', '/')} |")
    out += ["", "**targets**", "", "| target | measured | wanted | |", "|---|---|---|---|"]
    for t in res["targets"]:
        out.append(f"| {t['target']} | {fmt(t['measured'], 3)} | {t['wanted']} | {t['status']} |")
    for n in res["notes"]:
        out += ["", f"Note: {n}"]
    return "\n".join(out) + "\n"


def chart(res: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install matplotlib)"
    rows = {(r["group"], r["key"]): r["value"] for r in res["rows"]}
    names = {"loopback": "(c) loopback", "port_forward": "(b) port-fwd", "direct": "(a) in-cluster",
             "passthrough": "(d) passthrough", "intercept": "intercept", "header_matched": "hdr matched",
             "header_unmatched": "hdr unmatched"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    lat = [(names[k], v) for (g, k), v in rows.items() if g == "latency" and isinstance(v, dict)]
    ax = axes[0]
    xs = range(len(lat))
    ax.bar([x - 0.2 for x in xs], [v["p50_ms"] for _, v in lat], 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [v["p99_ms"] for _, v in lat], 0.4, label="p99")
    ax.set_xticks(list(xs), [n for n, _ in lat], rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("1 KiB request latency (keep-alive, fixed rate)")
    ax.legend()
    bulk = [(names[k], v) for (g, k), v in rows.items() if g == "bulk" and isinstance(v, dict)]
    ax = axes[1]
    xs = range(len(bulk))
    ax.bar([x - 0.2 for x in xs], [v["down_MBps"] for _, v in bulk], 0.4, label="server -> caller")
    ax.bar([x + 0.2 for x in xs], [v["up_MBps"] for _, v in bulk], 0.4, label="caller -> server")
    ax.set_xticks(list(xs), [n for n, _ in bulk], rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("MB/s (log)")
    ax.set_title("bulk transfer")
    ax.legend(fontsize=8)
    conc = [(names[k], v) for (g, k), v in rows.items() if g == "concurrency" and isinstance(v, dict)]
    ax = axes[2]
    xs = range(len(conc))
    ax.bar(list(xs), [v["p99_ms"] for _, v in conc], 0.6)
    for x, (_, v) in zip(xs, conc):
        ax.text(x, v["p99_ms"], f"{v['rps']:.0f}/s\nerr {v['errors']}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [n for n, _ in conc], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("p99 ms")
    p = res["params"]
    ax.set_title(f"{p['conc_conns']} connections, {p['conc_rate']} req/s target")
    fig.suptitle(f"tpenv bench ({res['mode']}, {res['started']}, {res['machine']['cpus']} CPUs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="day-to-day figures, under 3 minutes")
    g.add_argument("--smoke", action="store_true", help="every row once with tiny counts (CI), under a minute")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="results directory (default bench/results)")
    p.add_argument("--keep", action="store_true", help="keep the bench namespace afterwards")
    p.add_argument("--profile", action="store_true",
                   help="sample the tpenv client and the agent with py-spy during the intercept's bulk and "
                        "concurrency steps and the passthrough rounds (top functions in the JSON)")
    p.add_argument("--only", metavar="PHASE,...", help=f"run only these phases of {','.join(PHASES)} "
                   "(the agent is still injected by a first tpenv intercept when a phase needs it)")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(PHASES)
    if only - set(PHASES):
        p.error(f"--only: unknown phase(s) {', '.join(sorted(only - set(PHASES)))}; known: {', '.join(PHASES)}")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.out.mkdir(parents=True, exist_ok=True)
    stamp0 = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    prof = args.out / f"profiles-{stamp0}" if args.profile else None
    if prof:
        prof.mkdir(parents=True, exist_ok=True)
    b = Bench(mode, args.out, args.keep, prof, only)

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    res = b.run()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res["only"] = sorted(only)
    if only != set(PHASES):
        mode = f"{mode}-{'-'.join(sorted(only))}"
    png = args.out / f"{stamp}-{mode}.png"
    why = chart(res, png)
    if why:
        res["notes"].append(why)
    else:
        res["chart"] = str(png)
        (args.out / f"latest-{mode}.png").write_bytes(png.read_bytes())
    text = json.dumps(res, indent=1)
    (args.out / f"{stamp}-{mode}.json").write_text(text)
    (args.out / f"latest-{mode}.json").write_text(text)
    (args.out / f"latest-{mode}.md").write_text(markdown(res))
    print(table(res))
    print(f"\nJSON: {args.out / f'{stamp}-{mode}.json'}" + (f"\nchart: {png}" if not why else f"\n{why}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
