"""The baselines measured from the host: (c) loopback TCP to bench/server.py, and (b) `kubectl
port-forward` to the app pod, with the CPU the cluster's daemons spend carrying its bytes."""
from __future__ import annotations

from bench.common import Unavailable
from bench.meters import Procs, infra_pids
from bench.processes import PortForward
from bench.session import Bench, bulk_row


def phase_loopback(bench: Bench) -> None:
    assert bench.server
    p = bench.server.port
    keys = [("latency", "loopback"), ("bulk", "loopback"), ("concurrency", "loopback")]

    def run() -> None:
        r = bench.host([bench.lat("lat", "127.0.0.1", p), bench.bulk("down", "127.0.0.1", p, "down"),
                        bench.bulk("up", "127.0.0.1", p, "up"), bench.conc("conc", "127.0.0.1", p)])
        bench.put("latency", "loopback", bench.checked(r[0]))
        bench.put("bulk", "loopback", bulk_row(r[1], r[2]))
        bench.put("concurrency", "loopback", bench.checked(r[3]))

    bench.step("(c) loopback", keys, run)



def phase_port_forward(bench: Bench) -> None:
    keys = [("latency", "port_forward"), ("bulk", "port_forward"), ("concurrency", "port_forward"),
            ("hol", "port_forward"), ("resources", "infra_cpu_per_gb_port_forward")]

    def run() -> None:
        pf = PortForward(bench.ns, bench.app_pod(), 8080)
        try:
            p = pf.port
            infra = Procs(infra_pids() + [pf.proc.pid])
            r = bench.host([bench.lat("lat", "127.0.0.1", p)])
            bench.put("latency", "port_forward", bench.checked(r[0]))
            i0 = infra.sample()[0]
            r = bench.host([bench.bulk("down", "127.0.0.1", p, "down"), bench.bulk("up", "127.0.0.1", p, "up")])
            i1 = infra.sample()[0]
            bench.put("bulk", "port_forward", bulk_row(r[0], r[1]))
            bench.put("resources", "infra_cpu_per_gb_port_forward",
                      {"cpu_s_per_GB": (i1 - i0) / (2 * bench.m["bulk"] / 1e9), "with": "kubectl port-forward"})
            r = bench.host([bench.conc("conc", "127.0.0.1", p), bench.hol("hol", "127.0.0.1", p)])
            for key, x in ((("concurrency", "port_forward"), r[0]), (("hol", "port_forward"), r[1])):
                try:
                    bench.put(*key, bench.checked(x, "cluster"))
                except Unavailable as e:
                    bench.put(*key, f"unavailable: {e}")
        finally:
            pf.stop()

    bench.step("(b) kubectl port-forward", keys, run)

