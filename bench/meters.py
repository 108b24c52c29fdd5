"""What a run measures besides the load's own figures: CPU and RSS of host processes (/proc), of a
container (its cgroup), of the whole machine and of the local cluster's daemons; py-spy profiles."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.cluster_setup import kjson
from bench.common import Unavailable


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

