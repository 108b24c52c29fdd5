"""The rows of a mirror intercept (issue #11): the app answers every request while copies of the
matched ones go to the laptop, and a stopped laptop handler must not move the app's p99.

Three latency steps on the same path (in-cluster caller -> Service -> agent -> app), in one run:
no mirror (the baseline), a mirror whose laptop handler answers, and a mirror whose handler is
gone (every copy fails and is dropped). Each row carries its p99 as a ratio to the baseline's.
"""
from __future__ import annotations

import socket

from bench.common import log
from bench.processes import Intercept
from bench.session import Bench

KEYS = [("latency", "mirror_baseline"), ("latency", "mirror_handler_up"), ("latency", "mirror_handler_stopped")]
HEADERS = {"x-bench": "yes"}


def _closed_port() -> int:
    """A local port nothing listens on (the handler that has stopped)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phase_mirror(bench: Bench) -> None:
    log("mirror intercept")
    args = ("--name", "bench-mirror", "--mount", "false", "--mirror", "--http-header", "x-bench=yes")
    base: dict = {}

    def measure(key: tuple[str, str]) -> None:
        [r] = bench.cluster([bench.lat(key[1], bench.app_ip, 80, headers=HEADERS)])
        r = bench.checked(r, by="cluster")  # a mirror never answers: the app does, every time
        if key[1] == "mirror_baseline":
            base["p99"] = r["p99_ms"]
        elif base.get("p99"):
            r["p99_ratio_to_baseline"] = r["p99_ms"] / base["p99"]
        bench.put(*key, r)

    bench.step("mirror: baseline, no mirror", KEYS[:1], lambda: measure(KEYS[0]))
    try:
        bench.ic = bench.start_intercept("mirror_intercept_s", *args)
        bench.step("mirror: laptop handler up", KEYS[1:2], lambda: measure(KEYS[1]))
    except Exception as e:  # noqa: BLE001
        bench.unavailable(KEYS[1:2], f"tpenv intercept --mirror: {e}")
    finally:
        if bench.ic is not None:
            bench.ic.stop()
        bench.ic = None
    ic = Intercept(bench.tmp / "state", "bench-app", "--port", f"{_closed_port()}:80", "--service", "bench-app",
                   "-n", bench.ns, *args)
    try:
        ic.ready(240)
        bench.step("mirror: laptop handler stopped", KEYS[2:], lambda: measure(KEYS[2]))
    except Exception as e:  # noqa: BLE001
        bench.unavailable(KEYS[2:], f"tpenv intercept --mirror (handler stopped): {e}")
    finally:
        ic.stop()
