"""The rows of a tpenv intercept: the global one (latency, bulk, concurrency, head-of-line blocking,
the mount, the client's and the agent's RSS and CPU) and the header one (HTTP/1.1 and gRPC, matched
requests to the laptop, the others to the app)."""
from __future__ import annotations

import platform
import time
from typing import Any

from bench.common import MiB, PathLost, Unavailable, log
from bench.meters import PeakRss, Procs, container_pids, infra_pids
from bench.phase_mount import mount, mount_peer
from bench.session import Bench, bulk_row


def phase_intercept(bench: Bench) -> None:
    ikeys = [("latency", "intercept"), ("bulk", "intercept"), ("concurrency", "intercept"), ("hol", "intercept"),
             ("resources", "client_rss_idle"), ("resources", "client_rss_load"), ("resources", "agent_rss_idle"),
             ("resources", "agent_rss_load"), ("resources", "client_cpu_per_gb"),
             ("resources", "agent_cpu_per_gb"), ("resources", "infra_cpu_per_gb")]
    mkeys = [("mount", "read"), ("mount", "write"), ("mount", "stat")]
    mnt = bench.tmp / "mnt"
    mnt.mkdir()
    st: dict[str, Any] = {}

    def establish(key: str) -> None:
        """(Re)start the global intercept; the pids and pod it serves."""
        if bench.ic is not None:
            bench.ic.stop()
        bench.ic = bench.start_intercept(key, "--mount", str(mnt))
        st["ic"] = bench.ic
        st["pod"] = bench.app_pod()
        st["client"] = Procs([bench.ic.proc.pid])
        apids = container_pids(bench.ns, st["pod"], "tpenv-agent")
        bench.agent_procs = Procs(apids) if apids else None
        st["who"] = {"client": [bench.ic.proc.pid], "agent": apids}

    def again() -> None:
        bench.notes.append("the intercept was lost during a step (another session's `tpenv uninstall "
                           "--everything` removes every agent of the cluster); re-established, step run again")
        establish("reestablish_s")

    log("global intercept (first run: injects the agent)")
    try:
        establish("first_intercept_s")
    except Exception as e:  # noqa: BLE001
        bench.unavailable([("setup", "first_intercept_s"), *ikeys, *mkeys], f"tpenv intercept: {e}")
        return
    try:
        infra = Procs(infra_pids())
        ip, port = bench.app_ip, 80

        def idle_rss() -> None:
            time.sleep(1.0)
            bench.put("resources", "client_rss_idle", {"MiB": st["client"].sample()[1] / MiB})
            if bench.agent_procs:
                bench.put("resources", "agent_rss_idle", {"MiB": bench.agent_procs.sample()[1] / MiB})
            else:
                raise Unavailable("agent process not found on this host (not the local cluster?)")

        bench.step("intercept: idle RSS", [("resources", "client_rss_idle"), ("resources", "agent_rss_idle")],
                   idle_rss)

        def latency() -> None:
            bench.put("latency", "intercept", bench.checked(bench.cluster([bench.lat("lat", ip, port)])[0], "laptop"))

        bench.step("intercept: latency", [("latency", "intercept")], latency, again)

        def bulk() -> None:
            agent = bench.agent_procs or Procs([])
            c0, a0, i0 = st["client"].sample()[0], agent.sample()[0], infra.sample()[0]
            with bench.profile("intercept-bulk", st["who"]):
                r = bench.cluster([bench.bulk("down", ip, port, "down"), bench.bulk("up", ip, port, "up")])
            c1, a1, i1 = st["client"].sample()[0], agent.sample()[0], infra.sample()[0]
            bench.put("bulk", "intercept", bulk_row(bench.checked(r[0], "laptop"), bench.checked(r[1], "laptop")))
            gb = 2 * bench.m["bulk"] / 1e9
            bench.put("resources", "client_cpu_per_gb", {"cpu_s_per_GB": (c1 - c0) / gb})
            if bench.agent_procs:
                bench.put("resources", "agent_cpu_per_gb", {"cpu_s_per_GB": (a1 - a0) / gb})
            bench.put("resources", "infra_cpu_per_gb", {"cpu_s_per_GB": (i1 - i0) / gb, "pids": infra.pids})

        bench.step("intercept: bulk", [("bulk", "intercept"), ("resources", "client_cpu_per_gb"),
                                       ("resources", "agent_cpu_per_gb"), ("resources", "infra_cpu_per_gb")],
                   bulk, again)

        def conc() -> None:
            with PeakRss(st["client"]) as cp, PeakRss(bench.agent_procs or Procs([])) as ap, \
                    bench.profile("intercept-concurrency", st["who"]):
                r = bench.checked(bench.cluster([bench.conc("conc", ip, port)])[0], "laptop")
            bench.put("concurrency", "intercept", r)
            bench.put("resources", "client_rss_load", {"MiB": cp.peak / MiB})
            if bench.agent_procs and ap.peak:
                bench.put("resources", "agent_rss_load", {"MiB": ap.peak / MiB})

        bench.step("intercept: concurrency", [("concurrency", "intercept"), ("resources", "client_rss_load"),
                                              ("resources", "agent_rss_load")], conc, again)
        bench.step("intercept: head-of-line", [("hol", "intercept")],
                   lambda: bench.put("hol", "intercept",
                                     bench.checked(bench.cluster([bench.hol("hol", ip, port)])[0], "laptop")), again)
        def mount_step() -> None:
            # --profile: the client's pumps and the agent's SFTP server over the whole step
            # (the pod-side file preparation included, which the agent does not take part in).
            with bench.profile("intercept-mount", st["who"]):
                mount(bench, st["ic"], st["pod"])

        bench.step("intercept: mount", mkeys, mount_step, again)
        # After the mount step, in the same pod, on the file it put there (the intercept stays).
        bench.step("intercept: the mount's peer", [("mount", "read_peer")], lambda: mount_peer(bench, st["pod"]))
    finally:
        if bench.ic is not None:
            bench.ic.stop()
        bench.ic = None



def phase_header(bench: Bench) -> None:
    keys = [("latency", "header_matched"), ("latency", "header_unmatched"), ("grpc", "header_matched"),
            ("grpc", "header_unmatched")]
    args = ("--name", "bench-hdr", "--mount", "false", "--http-header", "x-bench=yes")
    log("header intercept")
    try:
        bench.ic = bench.start_intercept("intercept_s", *args)
    except Exception as e:  # noqa: BLE001
        bench.unavailable([("setup", "intercept_s"), *keys], f"tpenv intercept --http-header: {e}")
        return

    def again() -> None:
        bench.notes.append("the header intercept was lost during its step (another session's `tpenv uninstall "
                           "--everything`?); re-established, step run again")
        if bench.ic is not None:
            bench.ic.stop()
        bench.ic = bench.start_intercept("reestablish_s", *args)

    try:
        def run() -> None:
            h = {"x-bench": "yes"}
            r = bench.cluster([bench.lat("m", bench.app_ip, 80, headers=h), bench.lat("u", bench.app_ip, 80),
                               bench.grpc("gm", bench.app_ip, 80, headers=h), bench.grpc("gu", bench.app_ip, 80)])
            host = platform.node()
            pod = bench.app_pod()
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
                bench.put(*key, x)

        bench.step("header intercept: HTTP/1.1 and gRPC, matched and not", keys, run, again)
    finally:
        if bench.ic is not None:
            bench.ic.stop()
        bench.ic = None

