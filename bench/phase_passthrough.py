"""Issue 4's passthrough cost: the same in-cluster requests to the app directly ((a), Service
bench-direct, a port nothing redirects), through the agent in passthrough ((d), Service bench-app)
and through HAProxy in the agent's place ((e), Service bench-haproxy: a plain TCP proxy in a sidecar
of the same pod, the compiled-proxy peer of issue 13, reached through an in-pod REDIRECT like the
agent's: bench/cluster_setup.py HAPROXY_FRONT), interleaved in rounds so every side shares the
machine's mood; latency, closed-loop throughput (wrk, then the Python client) with the CPU per
request, bulk, the agent's CPU per GB, concurrency and gRPC. Every answer says how it reached the app
(X-Bench-Hop): a direct row that crossed a proxy, or a proxied one that did not, is not counted.
The agent and HAProxy again with the app answering in two writes (bench/server.py answer_parts).
Then the agent again with ``--http1-passthrough raw`` (its default, switch, splices raw too while no
intercept holds the port, but watches for one; route parses HTTP/1 per request) next to HAProxy, wrk only."""
from __future__ import annotations

import json
import statistics
import time

from bench.cluster_setup import kjson, kubectl
from bench.common import KiB, PathLost, Unavailable
from bench.meters import ContainerCpu, MachineCpu, Procs, container_pids
from bench.session import Bench


def phase_passthrough(bench: Bench) -> None:
    """Issue 4: the same requests to the app directly and through the agent, interleaved in rounds."""
    keys = [("latency", "direct"), ("latency", "passthrough"), ("throughput", "direct_wrk"),
            ("throughput", "passthrough_wrk"), ("throughput", "direct"), ("throughput", "passthrough"),
            ("bulk", "direct"), ("bulk", "passthrough"), ("latency", "haproxy"), ("throughput", "haproxy_wrk"),
            ("throughput", "haproxy"), ("bulk", "haproxy")]
    targets = {"direct": bench.direct_ip, "passthrough": bench.app_ip, "haproxy": bench.haproxy_ip}
    hops = {"direct": "direct", "passthrough": "proxy", "haproxy": "proxy"}
    why = bench.agent_missing()
    if why and isinstance(bench.rows.get(("setup", "first_intercept_s")), dict):
        bench.notes.append(f"the agent was gone before the passthrough phase ({why}: another session's "
                           "`tpenv uninstall --everything`?); injected again")
        bench.inject_only("reinject_s")
        why = bench.agent_missing()
    if not why:
        apids = container_pids(bench.ns, bench.app_pod(), "tpenv-agent")
        bench.agent_procs = Procs(apids) if apids else None
        # Which event loop the agent runs (uvloop, or asyncio's with the reason): it moves the figures.
        logs = kubectl("logs", bench.app_pod(), "-c", "tpenv-agent", ns=bench.ns, check=False).stdout
        line = next((ln for ln in logs.splitlines() if "event loop:" in ln), None)
        bench.agent_loop = json.loads(line)["msg"].split("event loop:", 1)[1].strip() if line else "unknown"
    pod0 = bench.app_pod() if not why else ""

    def same_agent() -> None:
        """Passthrough answers come from the app either way: check the agent stayed for the whole step."""
        gone = bench.agent_missing()
        if gone or bench.app_pod() != pod0:
            raise PathLost(f"the agent or its pod changed during the step ({gone or 'new pod'})")

    def again() -> None:
        nonlocal pod0
        bench.notes.append("the agent went away during a passthrough step; injected again, step run again")
        bench.inject_only("reinject_s")
        pod0 = bench.app_pod()

    if why:
        bench.unavailable([*keys, ("resources", "agent_cpu_per_gb_passthrough"), ("concurrency", "passthrough"),
                           ("grpc", "passthrough")], why)

    def cpu_meters() -> dict[str, ContainerCpu]:
        """CPU of the app's and the agent's containers (the load generator reports its own)."""
        pod = bench.app_pod()
        return {"app": ContainerCpu(bench.ns, pod, "app"), "agent": ContainerCpu(bench.ns, pod, "tpenv-agent"),
                "haproxy": ContainerCpu(bench.ns, pod, "haproxy")}

    machine = MachineCpu()

    def closed_loop(task: dict, meters: dict[str, ContainerCpu] | None) -> dict:
        """One closed-loop task in its own exec, with the CPU each container spent meanwhile
        (and the whole machine's: other sessions' work and the kernel's softirq are in it)."""
        c0 = {k: m.sample() for k, m in (meters or {}).items()}
        m0, t0 = machine.sample(), time.monotonic()
        r = bench.checked(bench.cluster([task])[0])  # (wrk reports no headers; the rounds' tasks check the hop)
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
            bench.notes.append(f"passthrough: no CPU per request ({e})")
        rounds = bench.m["pt_rounds"]
        lat: dict[str, list[dict]] = {k: [] for k in targets}
        rps: dict[str, list[dict]] = {k: [] for k in targets}
        wrk: dict[str, list[dict]] = {k: [] for k in targets}
        wrk_failed: list[str] = []
        bulks: dict[str, list[dict]] = {k: [] for k in targets}
        # wrk's closed loop: short runs, one exec each (CPU measured around it), the sides alternating
        # (direct, agent, agent, direct, ...) so that both see the same background load.
        with bench.profile("passthrough-wrk", {"agent": bench.agent_procs.pids if bench.agent_procs else []}):
            for i in range(bench.m["pt_wrk_rounds"]):
                order = list(targets.items()) if i % 2 == 0 else list(reversed(targets.items()))
                for k, ip in order:
                    if wrk_failed:
                        break
                    try:
                        wrk[k].append(closed_loop({"kind": "wrk", "label": f"wrk:{k}", "host": ip, "port": 80,
                                                   "conns": bench.m["pt_conns"], "threads": bench.m["pt_wrk_threads"],
                                                   "seconds": bench.m["pt_wrk_s"], "size": KiB}, meters))
                    except Unavailable as e:  # wrk missing or broken: the other rows still stand
                        if isinstance(e, PathLost):
                            raise
                        wrk_failed.append(str(e))
        for i in range(rounds):
            order = list(targets.items()) if i % 2 == 0 else list(reversed(targets.items()))
            tasks = []
            with bench.profile(f"passthrough-round{i}", {"agent": bench.agent_procs.pids if bench.agent_procs else []}):
                # The Python closed loop one exec per side (CPU measured around it), then the rest.
                for k, ip in order:
                    rps[k].append(closed_loop({"kind": "rps", "label": f"rps:{k}", "host": ip, "port": 80,
                                               "conns": bench.m["pt_conns"], "seconds": bench.m["pt_s"] / rounds,
                                               "size": KiB}, meters))
                for k, ip in order:
                    t = bench.lat(f"lat:{k}", ip, 80, raw=True, n=bench.m["pt_n"] // rounds, idle=(i == 0))
                    t["rate"] = bench.m["pt_rate"]
                    tasks.append(t)
                    tasks.append(bench.bulk(f"bulk-down:{k}", ip, 80, "down", bench.m["pt_bulk"] // rounds))
                    tasks.append(bench.bulk(f"bulk-up:{k}", ip, 80, "up", bench.m["pt_bulk"] // rounds))
                results = bench.cluster(tasks)
            for r in results:
                kind, k = r["label"].split(":")
                bench.checked(r, None if kind == "rps" else "cluster", hops[k])
                {"lat": lat, "rps": rps}.get(kind, bulks)[k].append(r)
        for k in targets:
            samples = [x for r in lat[k] for x in r.pop("samples_ms")]
            side = {}
            for r in lat[k]:
                for s, n in r.get("answered_by", {}).items():
                    side[s] = side.get(s, 0) + n
            bench.put("latency", k, {"n": len(samples), "errors": sum(r["errors"] for r in lat[k]),
                                     "p50_ms": pctl(samples, 50), "p90_ms": pctl(samples, 90),
                                     "p99_ms": pctl(samples, 99), "max_ms": max(samples),
                                     "mean_ms": statistics.fmean(samples), "idle_ms": lat[k][0].get("idle_ms"),
                                     "rate_target": bench.m["pt_rate"], "rounds": rounds, "answered_by": side})
            if wrk_failed:
                bench.put("throughput", f"{k}_wrk", f"unavailable: wrk: {wrk_failed[0]}")
            else:
                bench.put("throughput", f"{k}_wrk", {**throughput_row(wrk[k]), "client": "wrk",
                                                     "threads": bench.m["pt_wrk_threads"]})
            bench.put("throughput", k, {**throughput_row(rps[k]), "client": "python"})
            down = [r for r in bulks[k] if r["dir"] == "down"]
            up = [r for r in bulks[k] if r["dir"] == "up"]
            bench.put("bulk", k, {"down_MBps": sum(r["bytes"] for r in down) / sum(r["seconds"] for r in down) / 1e6,
                                  "up_MBps": sum(r["bytes"] for r in up) / sum(r["seconds"] for r in up) / 1e6,
                                  "bytes": bench.m["pt_bulk"]})
        same_agent()

    bench.step("(a)/(d)/(e) direct vs agent passthrough vs HAProxy, interleaved", keys, run, again)

    def wrk_pair(tag: str, meters: dict[str, ContainerCpu] | None, **task: object) -> None:
        """wrk rounds through the agent and HAProxy, alternating who goes first, then the hop of each
        side once (wrk reports no headers); rows passthrough_<tag>_wrk and haproxy_<tag>_wrk."""
        sides = [(f"passthrough_{tag}", bench.app_ip), (f"haproxy_{tag}", bench.haproxy_ip)]
        runs: dict[str, list[dict]] = {k: [] for k, _ in sides}
        for n in range(bench.m["pt_wrk_rounds"]):
            for k, ip in (sides if n % 2 == 0 else sides[::-1]):
                runs[k].append(closed_loop({"kind": "wrk", "label": f"wrk:{k}", "host": ip, "port": 80,
                                            "conns": bench.m["pt_conns"], "threads": bench.m["pt_wrk_threads"],
                                            "seconds": bench.m["pt_wrk_s"], "size": KiB, **task}, meters))
        for k, ip in sides:
            [r] = bench.cluster([bench.lat(f"hop:{k}", ip, 80, n=20, idle=False)])
            bench.checked(r, "cluster", "proxy")
        same_agent()
        for k in runs:
            bench.put("throughput", f"{k}_wrk", {**throughput_row(runs[k]), "client": "wrk",
                                                 "threads": bench.m["pt_wrk_threads"], **task})

    def two_writes() -> None:
        """The same wrk rounds through the agent and HAProxy, the app answering each request in two
        writes (headers, then body: bench/server.py answer_parts), as Python's http.server does. A
        proxy that forwards each segment as it comes wakes the caller twice per answer; one that
        reads a little later takes both at once. Shown beside the one-write pair, no target."""
        if why:
            raise Unavailable(why)
        try:
            meters: dict[str, ContainerCpu] | None = cpu_meters()
        except Unavailable:  # the main step noted it
            meters = None
        wrk_pair("2w", meters, writes=2)

    bench.step("agent vs HAProxy, the app answering in two writes, wrk",
               [("throughput", "passthrough_2w_wrk"), ("throughput", "haproxy_2w_wrk")], two_writes, again)

    def raw() -> None:
        """The agent restarted with --http1-passthrough raw (splice, no per-request parsing), then
        the same wrk rounds through it and through HAProxy; the option is taken back afterwards."""
        if why:
            raise Unavailable(why)
        dep = kjson("get", "deployment", "bench-app", ns=bench.ns)
        names = [c["name"] for c in dep["spec"]["template"]["spec"]["containers"]]
        i = names.index("tpenv-agent")
        args = dep["spec"]["template"]["spec"]["containers"][i].get("args") or []
        path = f"/spec/template/spec/containers/{i}/args"

        def patch(ops: list[dict]) -> None:
            nonlocal pod0
            old = bench.app_pod()
            kubectl("patch", "deployment", "bench-app", "--type=json", "-p", json.dumps(ops), ns=bench.ns)
            kubectl("rollout", "status", "deployment/bench-app", "--timeout=180s", ns=bench.ns, timeout=200)
            # While the old pod terminates it may still answer the check below, and then refuse wrk's
            # connections (both Services: HAProxy is in the same pod): wait until it is gone.
            kubectl("wait", "--for=delete", f"pod/{old}", "--timeout=120s", ns=bench.ns, timeout=150, check=False)
            pod0 = bench.app_pod()
            # Ready is not routed: until each Service answers through the new pod.
            bench.routed(bench.app_ip, "proxy", "the agent's restart")
            bench.routed(bench.haproxy_ip, "proxy", "HAProxy after the agent's restart")

        patch([{"op": "add", "path": path, "value": [*args, "--http1-passthrough", "raw"]}])
        try:
            wrk_pair("raw", cpu_meters())
        finally:
            patch([{"op": "replace", "path": path, "value": args}] if args else [{"op": "remove", "path": path}])

    def cpu() -> None:
        apids = container_pids(bench.ns, bench.app_pod(), "tpenv-agent")
        if not apids:
            raise Unavailable("agent process not found on this host")
        procs = Procs(apids)
        a0 = procs.sample()[0]
        r = bench.cluster([bench.bulk("down", bench.app_ip, 80, "down"), bench.bulk("up", bench.app_ip, 80, "up")])
        a1 = procs.sample()[0]
        for x in r:
            bench.checked(x, "cluster")
        same_agent()
        row = {"cpu_s_per_GB": (a1 - a0) / (2 * bench.m["bulk"] / 1e9)}
        if a1 == a0:
            row["note"] = "below the clock tick for this transfer size"
        bench.put("resources", "agent_cpu_per_gb_passthrough", row)

    bench.step("agent CPU per GB in passthrough", [("resources", "agent_cpu_per_gb_passthrough")], cpu)

    def conc_grpc() -> None:
        r = bench.cluster([bench.conc("conc:direct", bench.direct_ip, 80), bench.conc("conc:pt", bench.app_ip, 80),
                           bench.grpc("grpc:direct", bench.direct_ip, 80), bench.grpc("grpc:pt", bench.app_ip, 80)])
        for (g, k), x in zip([("concurrency", "direct"), ("concurrency", "passthrough"), ("grpc", "direct"),
                              ("grpc", "passthrough")], r):
            bench.put(g, k, x if "failed" not in x else f"unavailable: {x['failed']}")
        same_agent()

    bench.step("concurrency and gRPC, direct and passthrough",
               [("concurrency", "direct"), ("concurrency", "passthrough"), ("grpc", "direct"), ("grpc", "passthrough")],
               conc_grpc, again)
    # Last: it restarts the agent twice, and the Service refuses connections until kube-proxy routes to the
    # new pod (seconds after `rollout status`); a step after it had its first connection refused.
    bench.step("agent --http1-passthrough raw vs HAProxy, wrk", [("throughput", "passthrough_raw_wrk"),
                                                                 ("throughput", "haproxy_raw_wrk")], raw)



def pctl(samples: list[float], p: float) -> float | None:
    if not samples:
        return None
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

