"""Smoke test of the benchmarks (issues 7, 13, 14): `bench/run.py --quick`, the day-to-day mode,
runs against the cluster and writes a JSON with every row measured.

A row the bench could not measure says "unavailable: <reason>" in the table; here it fails the
test, every one named with its reason: a tpenv feature that broke (the intercept, the mount, the
mirror), a baseline whose path changed (the "direct" one crossing the agent), a tool missing
(sshfs, wrk, haproxy: the project's own scripts install them). No thresholds on the figures: the
table goes to the log (printed past pytest's capture), timing is the bench's business, not CI's.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.rows import ROWS  # the list of rows (a plain module; the runner itself is only run)

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(660)]


def test_bench_quick_writes_every_row(kubeconfig, tmp_path, capsys):

    cp = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(tmp_path)],
                        capture_output=True, text=True, timeout=600, cwd=REPO)
    with capsys.disabled():  # the table, for the CI log, pass or fail
        print("\n" + cp.stdout)
    assert cp.returncode == 0, f"bench exited {cp.returncode}\n{cp.stdout}\n{cp.stderr[-3000:]}"
    res = json.loads((tmp_path / "latest-quick.json").read_text())
    got = {(r["group"], r["key"]): r["value"] for r in res["rows"]}
    assert list(got) == [(g, k) for g, k, _ in ROWS]
    for key, value in got.items():
        if isinstance(value, str):
            assert value.startswith("unavailable: ") and len(value) > len("unavailable: "), (key, value)
        else:
            assert isinstance(value, dict) and value, (key, value)
    missing = {f"{g}/{k}": v for (g, k), v in got.items() if isinstance(v, str)}
    assert not missing, "rows the bench could not measure:\n" + "\n".join(f"  {k}: {v}" for k, v in missing.items())
    # Every target has both of its rows: none is left "n/a" for a missing figure.
    assert not [t for t in res["targets"] if t.get("missing")], [t for t in res["targets"] if t.get("missing")]
    assert res["targets"] and all(t["status"] in ("met", "missed", "n/a") for t in res["targets"])
    assert res["machine"]["cpus"] and res["duration_s"] > 0
    # The one baseline that needs neither the cluster nor tpenv is measured in every run.
    assert isinstance(got[("latency", "loopback")], dict), got[("latency", "loopback")]
