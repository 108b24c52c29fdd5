"""What both measurements of `tpenv up` share (bench/up_latency.py, the standalone one, and the `up`
phase of bench/run.py, bench/phase_up.py): line streams stamped as they arrive, the in-cluster curl
client, `tpenv up` on a one-intercept config with the phases of its log, and one injecting run next
to its plain-rollout floor."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster.images import agent_image_ref  # noqa: E402
from tests.kit.apps import echo_app  # noqa: E402
from tests.kit.kubectl import apply, kubectl, kubectl_binary  # noqa: E402

TPENV = str(Path(sys.executable).parent / "tpenv")


class Stream:
    """A line-producing subprocess; every line stamped with time.monotonic() as it arrives."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=cwd, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cv.notify_all()

    def first(self, pred: Callable[[str], bool], after: float, timeout: float) -> float | None:
        """The stamp of the first line after ``after`` matching ``pred``; None on timeout."""
        end = time.monotonic() + timeout
        i = 0
        with self._cv:
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    i += 1
                    if t >= after and pred(line):
                        return t
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and i >= len(self.lines):
                    return None
                self._cv.wait(min(left, 0.5))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


def answers(ns: str, url: str, client: str = "client") -> Stream:
    """The in-cluster client: curl in a loop in pod ``client``, one JSON answer (or an empty line) per request."""
    loop = f"while :; do curl -s -m 1 {url}; echo; sleep 0.02; done"
    return Stream([kubectl_binary(), "-n", ns, "exec", "-i", client, "--", "sh", "-c", loop])


def _answer(line: str) -> dict:
    try:
        a = json.loads(line)
    except ValueError:
        return {}
    return a if isinstance(a, dict) else {}


def laptop(version: str | None = None) -> Callable[[str], bool]:
    def pred(line: str) -> bool:
        a = _answer(line)
        return a.get("source") == "laptop" and (version is None or a.get("version") == version)
    return pred


def cluster(line: str) -> bool:
    return _answer(line).get("source") == "cluster"


def from_new_pod(old: set[str]) -> Callable[[str], bool]:
    """An answer from the cluster's app in a pod not in ``old``."""
    def pred(line: str) -> bool:
        a = _answer(line)
        return a.get("source") == "cluster" and a.get("pod") not in old
    return pred


def pod_names(ns: str, app: str) -> set[str]:
    return set(kubectl("get", "pods", "-l", f"app={app}", "-o", "jsonpath={.items[*].metadata.name}",
                       ns=ns).stdout.split())


def deploy(name: str, ns: str) -> None:
    apply(echo_app(name), ns=ns)
    kubectl("rollout", "status", f"deployment/{name}", "--timeout=120s", ns=ns, timeout=150)


def median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def spread(xs: list[float]) -> dict[str, float]:
    """The mean of the runs and its standard error: with the steps dephased, each figure is
    bimodal (one kubelet relist more or less), and the mean says how far apart two steps are on
    average where the median jumps between the modes."""
    if len(xs) < 2:
        return {"mean": round(xs[0], 3)} if xs else {}
    return {"mean": round(statistics.fmean(xs), 3), "sem": round(statistics.stdev(xs) / len(xs) ** 0.5, 3)}


# Where the time of `up` goes: the first line of each phase in its output.
PHASES = {"session": r"\] session ", "resolved": r"Using |Injecting|Waiting for deployment",
          "tunnel": r"intercept \S+ registered", "intercepting": r"\] intercepting ",
          "handler_spawned": r"\[handler/\S+\] running", "handler_listening": r"^\[handler/\S+\] serving"}


class Up:
    """`tpenv up` on a one-intercept telepresence.yaml in ``work`` (the handler: ``work``/h/server.py)."""

    def __init__(self, work: Path, ns: str, name: str, port: int, image: str | None = None) -> None:
        self.work, self.ns, self.name, self.port = work, ns, name, port
        (work / "telepresence.yaml").write_text(
            f"apiVersion: tpenv/v1\nnamespace: {ns}\nintercepts:\n"
            f"  - name: {name}\n    workload: deployment/{name}\n    port: {port}:web\n"
            f"    env: {{set: {{PORT: \"{port}\", NAME: {name}}}}}\n    mount: false\n"
            f"    run: {{command: [{sys.executable}, server.py], cwd: h, watch: [\"*.py\"]}}\n")
        self.env = dict(os.environ, TPENV_AGENT_IMAGE=image or agent_image_ref(), TPENV_AGENT_IMAGE_PULL_POLICY="Never",
                        TPENV_SESSION_STATE_DIR=str(work / "state"))
        self.stream: Stream | None = None
        self.started = 0.0

    def start(self) -> float:
        self.started = time.monotonic()
        self.stream = Stream([TPENV, "up"] + (["--debug"] if os.environ.get("UPDEBUG") else []), env=self.env, cwd=self.work)
        return self.started

    def stop(self) -> None:
        assert self.stream is not None
        rc = self.stream.stop(signal.SIGTERM)
        if rc != 0:
            raise RuntimeError(f"tpenv up exited {rc}:\n" + self.tail())

    def tail(self, n: int = 40) -> str:
        return "\n".join(x for _, x in self.stream.lines[-n:]) if self.stream else ""

    def marks(self) -> dict[str, float]:
        """Where the time went: seconds from start to the first line of each phase."""
        assert self.stream is not None
        # The handler starts before the route is probed, so the first answer can come before `up`
        # says "intercepting": wait for that line (bounded) so every phase is in every run.
        self.stream.first(lambda line: re.search(PHASES["intercepting"], line) is not None, self.started, 15)
        out: dict[str, float] = {}
        for key, rx in PHASES.items():
            t = next((t for t, line in self.stream.lines if re.search(rx, line)), None)
            if t is not None:
                out[key] = round(t - self.started, 3)
        return out


# The kubelet relists its containers once a second (PLEG) and a pod moves on only at a relist:
# its containers are seen running, probed and made Ready at the first relist after they start.
# Each timed step below starts right after the previous one settled, and that settling is itself
# seen at a relist, so without this every step would start at the same point of the kubelet's
# second, run after run: its pod's containers would start at the same offset from the next
# relist each time, and a step's median would say more about that offset than about the step
# (traced with the kubelet at -v=4, docs/performance.md "phase-locked to the relist"). A user's
# `tpenv up` or `kubectl rollout` comes at any point of that second: so does each step here.
DEPHASE_S = 1.0


def dephase() -> None:
    """Sleep a uniformly random part of the kubelet's relist period before a timed step."""
    time.sleep(random.uniform(0.0, DEPHASE_S))


def _timed_rollout(s: Stream, ns: str, name: str, template: dict, what: str, timeout: float,
                   failures: list[str]) -> float | None:
    """Seconds from patching the Deployment's pod ``template`` to the first answer from a new pod;
    None (and why, in ``failures``) when none answered within ``timeout``."""
    old = pod_names(ns, name)
    dephase()
    t_roll = time.monotonic()
    kubectl("patch", "deployment", name, "-p", json.dumps({"spec": {"template": template}}), ns=ns)
    t = s.first(from_new_pod(old), t_roll, timeout)
    if t is None:
        failures.append(f"{what}'s new pod did not answer within {timeout}s")
        return None
    return round(t - t_roll, 3)


def _settled(s: Stream, ns: str, name: str, after: str, timeout: float) -> None:
    """The Deployment rolled out and answering again (the next measurement starts from a steady state)."""
    kubectl("rollout", "status", f"deployment/{name}", "--timeout=120s", ns=ns, timeout=150)
    if s.first(cluster, time.monotonic(), timeout) is None:
        raise RuntimeError(f"{name} does not answer after {after}")


def injecting_run(ns: str, work: Path, name: str, port: int, timeout: float, *, client: str = "client",
                  image: str | None = None) -> dict:
    """One injecting run: a fresh Deployment ``name``; first its floor without tpenv, a plain rollout
    (a template annotation changed) -> the first answer from a new pod; then `tpenv up`, which injects
    the agent (another such rollout plus tpenv's own work) -> the first answer from the laptop. The
    difference is what tpenv adds; both include pod start and kube-proxy's sync. Last, once `up`
    restored it, a rollout adding a no-op init container: the floor of any in-pod redirect; and
    one adding a sidecar container that listens and has a readiness probe, as the agent does: the
    floor of any sidecar (Telepresence's traffic-agent, a service mesh's proxy). Returns
    {"floor_s", "up_s", "init_floor_s", "sidecar_floor_s", "marks", "failures"}; a figure that timed
    out is None with its reason in "failures". The Deployment and its Service are deleted afterwards."""
    out: dict = {"floor_s": None, "up_s": None, "init_floor_s": None, "sidecar_floor_s": None, "marks": {},
                 "failures": []}
    deploy(name, ns)
    up = Up(work, ns, name, port, image)
    s = answers(ns, f"http://{name}.{ns}/", client)
    try:
        if s.first(cluster, time.monotonic(), timeout) is None:
            raise RuntimeError(f"{name} does not answer")
        out["floor_s"] = _timed_rollout(s, ns, name, {"metadata": {"annotations": {"bench.tpenv.io/roll": "1"}}},
                                        "the plain rollout", timeout, out["failures"])
        _settled(s, ns, name, "its plain rollout", timeout)
        dephase()
        t0 = up.start()
        t = s.first(laptop(), t0, timeout)
        if t:
            out["up_s"] = round(t - t0, 3)
        else:
            out["failures"].append(f"no laptop answer within {timeout}s of `tpenv up`; its output:\n{up.tail(15)}")
        out["marks"] = up.marks() | ({"first_answer": out["up_s"]} if t else {})
        up.stop()
        # The floor of any in-pod redirect (tpenv's, Istio's, Linkerd's): a rollout that adds an
        # init container doing nothing. Its container must end before the app's start, which the
        # kubelet sees at a relist; the difference to the plain floor is that structural cost, and
        # `up` minus this floor is what tpenv adds beyond it. After `up` restored the Deployment.
        _settled(s, ns, name, "`tpenv up` restored it", timeout)
        image = json.loads(kubectl("get", "deployment", name, "-o", "json", ns=ns).stdout)[
            "spec"]["template"]["spec"]["containers"][0]["image"]
        noop = {"name": "noop", "image": image, "imagePullPolicy": "Never", "command": ["true"]}
        out["init_floor_s"] = _timed_rollout(s, ns, name, {"spec": {"initContainers": [noop]}},
                                             "the init-container rollout", timeout, out["failures"])
        # The floor of any sidecar: the same image serving a port of its own, probed like the
        # agent's /readyz (httpGet, period 5 s). The pod now has two containers to start, and is
        # Ready once both are running and probed. Strategic merge adds it by name.
        _settled(s, ns, name, "the init-container rollout", timeout)
        sidecar = {"name": "sidecar", "image": image, "imagePullPolicy": "Never",
                   "command": ["tpenv-echo", "--port", "9099"], "ports": [{"containerPort": 9099}],
                   "readinessProbe": {"httpGet": {"path": "/", "port": 9099}, "periodSeconds": 5}}
        out["sidecar_floor_s"] = _timed_rollout(s, ns, name, {"spec": {"initContainers": None, "containers": [sidecar]}},
                                                "the sidecar rollout", timeout, out["failures"])
    finally:
        s.stop()
        if up.stream is not None and up.stream.proc.poll() is None:
            up.stream.stop()
        kubectl("delete", "deployment,service", name, "--wait=false", ns=ns, check=False)
    return out


def phases_median(marks: list[dict[str, float]]) -> dict[str, float]:
    """The median of each phase over runs, in the order they came."""
    keys = {p for m in marks for p in m}
    med = {p: median([m[p] for m in marks if p in m]) for p in keys}
    return dict(sorted(med.items(), key=lambda kv: kv[1]))
