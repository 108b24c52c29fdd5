"""The state of one bench run and what every phase does with it: record a row, run a step so that a
failure marks its rows "unavailable: <why>" and the run goes on, build and run load tasks, set the
namespace up and take it down, start the intercept that injects the agent."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import string
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench import cluster_setup
from bench.cluster_setup import agent_image, kjson, kubectl, manifests
from bench.common import KiB, PathLost, Unavailable, log
from bench.meters import Procs, Profile, container_pids
from bench.processes import Intercept, LocalServer, budget_of, in_cluster, on_host
from bench.rows import MODES, PHASES


class Bench:
    """One run: its namespace and the processes it started, the rows measured so far, and the helpers
    every phase uses (bench/phase_*.py) to build load tasks, run them and record their rows."""

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
        self.app_ip = self.direct_ip = self.haproxy_ip = ""
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
    def checked(r: dict, by: str | None = None, hop: str | None = None) -> dict:
        """The task's result; Unavailable when it failed or (``by``) when not every answer came from there;
        (``hop``) when not every answer arrived at the app that way: "direct" from the caller, "proxy"
        through the agent or HAProxy (bench/server.py's X-Bench-Hop)."""
        if "failed" in r:
            raise Unavailable(r["failed"])
        refused = [e for e in r.get("error_samples") or [] if "ConnectionRefused" in e or "Connect call failed" in e]
        if refused:
            # A refusal is no slow answer: the path was not there (a rollout not yet routed), so the
            # figure measures something else; never averaged away under the 5 % below.
            raise Unavailable(f"{r.get('errors')} of {r.get('n')} requests failed, connections refused: {refused[0]}")
        if r.get("kind") in ("latency", "grpc", "hol") and r.get("errors", 0) > 0.05 * max(r.get("n", 0), 1):
            raise Unavailable(f"{r['errors']} of {r['n']} requests failed (the path broke during the step): "
                              f"{'; '.join(r.get('error_samples', [])[:2])}")
        if by is not None:
            sides = r.get("answered_by") or {}
            if set(sides) != {by}:
                raise PathLost(f"answers should all come from the {by}, came from {sides}: the path changed "
                                  "during the step (intercept lost?)")
        if hop is not None and "hops" in r and set(r["hops"]) != {hop}:
            # A baseline that crossed a proxy (or a proxied row that did not) measures the wrong path.
            raise Unavailable(f"answers should all have arrived at the app {hop}, arrived {r['hops']}: "
                              "the path is not the one this row names")
        return r

    def routed(self, host: str, hop: str, what: str, seconds: float = 90) -> None:
        """After a rollout the bench made (``what``): until a request from the client pod to ``host``
        (a ClusterIP) is answered via ``hop``; Unavailable with the reason past the bound."""
        [r] = self.cluster([{"kind": "routed", "label": f"routed:{what}", "host": host, "port": 80, "hop": hop,
                             "seconds": seconds}])
        if "failed" in r:
            raise Unavailable(f"after {what}: {r['failed']}")
        log(f"  {what}: routed via {hop} after {r['seconds']:.1f}s ({r['attempts']} attempts)")

    def cluster(self, tasks: list[dict]) -> list[dict]:
        return in_cluster(self.ns, tasks, budget_of(tasks))

    def host(self, tasks: list[dict]) -> list[dict]:
        return on_host(tasks, budget_of(tasks))

    # -- the namespace, its app pod and agent
    def setup(self) -> None:
        log(f"namespace {self.ns}, mode {self.mode}")
        kubectl("create", "namespace", self.ns)
        kubectl("label", "namespace", self.ns, "tpenv.io/bench=true", check=False)
        cluster_setup.AGENT_IMAGE = agent_image()
        log(f"agent image {cluster_setup.AGENT_IMAGE or '(tpenv default)'}")
        objects = manifests(self.ns, cluster_setup.AGENT_IMAGE)
        kubectl("apply", "-f", "-", ns=self.ns,
                input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
        self.server = LocalServer()
        kubectl("rollout", "status", "deployment/bench-app", "--timeout=120s", ns=self.ns, timeout=150)
        kubectl("wait", "--for=condition=Ready", "pod/bench-client", "--timeout=120s", ns=self.ns, timeout=150)
        self.app_ip = kjson("get", "service", "bench-app", ns=self.ns)["spec"]["clusterIP"]
        self.direct_ip = kjson("get", "service", "bench-direct", ns=self.ns)["spec"]["clusterIP"]
        self.haproxy_ip = kjson("get", "service", "bench-haproxy", ns=self.ns)["spec"]["clusterIP"]
        # Pods Ready is not Services routed: every measurement starts once each answers on its path.
        self.routed(self.direct_ip, "direct", "the app's rollout")
        self.routed(self.haproxy_ip, "proxy", "HAProxy's rollout")

    def app_pod(self) -> str:
        """The ready bench-app pod; one with the agent when there is one. Right after an injecting
        intercept is ready, the rollout's old pod (no agent) can still be Ready and not yet deleting:
        files put there (the mount rows) would never show through the intercept's mount."""
        pods = kjson("get", "pods", "-l", "app=bench-app", ns=self.ns)["items"]
        ready = [p for p in pods if not p["metadata"].get("deletionTimestamp")
                 and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]
        if not ready:
            raise Unavailable("no ready bench-app pod")
        ready.sort(key=lambda p: not any(c["name"] == "tpenv-agent" for c in p["spec"]["containers"]))
        return ready[0]["metadata"]["name"]

    def agent_missing(self) -> str | None:
        """Why bench-app's traffic does not go through an agent, or None when it does."""
        svc = kjson("get", "service", "bench-app", ns=self.ns)
        tp = str(svc["spec"]["ports"][0].get("targetPort"))
        try:
            pod = kjson("get", "pod", self.app_pod(), ns=self.ns)
        except Unavailable as e:
            return str(e)
        # The in-pod redirect leaves the Service's targetPort as it was; the agent in the pod is the sign.
        if not any(c["name"] == "tpenv-agent" for c in pod["spec"]["containers"]):
            return f"no agent in the app pod (the first tpenv intercept did not inject it; Service targetPort {tp})"
        return None

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
            # The injection rolled the pod: measure only once the Service reaches the agent's pod.
            self.routed(self.app_ip, "proxy", "the agent's injection")
            self.find_agent()
        except Exception as e:  # noqa: BLE001 - phase_passthrough then says there is no agent
            self.unavailable([("setup", key)], f"tpenv intercept: {e}")

    def find_agent(self) -> None:
        """``agent_procs``: the agent's processes in the ready app pod now. A phase that samples
        them looks them up itself: an earlier phase may have rolled the pod, and the pids it
        left are gone (their CPU reads as 0)."""
        apids = container_pids(self.ns, self.app_pod(), "tpenv-agent")
        self.agent_procs = Procs(apids) if apids else None

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


def bulk_row(down: dict, up: dict) -> dict:
    for r in (down, up):
        if "failed" in r:
            raise Unavailable(f"bulk {r.get('label')}: {r['failed']}")
    return {"down_MBps": down["MBps"], "up_MBps": up["MBps"], "bytes": down["bytes"],
            "down_s": down["seconds"], "up_s": up["seconds"]}

