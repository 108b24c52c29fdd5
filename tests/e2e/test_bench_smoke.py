"""Smoke test of the benchmarks (issue 7): `bench/run.py --quick`, the day-to-day mode, runs
against the cluster and writes a JSON with every row, each a measured value or
"unavailable: <reason>".

No thresholds: the table goes to the log (printed past pytest's capture), CI only checks that
the bench runs whole.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.rows import ROWS  # the list of rows (a plain module; the runner itself is only run)

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


def test_bench_quick_writes_every_row(kubeconfig, tmp_path, capsys):

    cp = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(tmp_path)],
                        capture_output=True, text=True, timeout=400, cwd=REPO)
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
    assert res["targets"] and all(t["status"] in ("met", "missed", "n/a") for t in res["targets"])
    assert res["machine"]["cpus"] and res["duration_s"] > 0
    # The one baseline that needs neither the cluster nor tpenv is measured in every run.
    assert isinstance(got[("latency", "loopback")], dict), got[("latency", "loopback")]
