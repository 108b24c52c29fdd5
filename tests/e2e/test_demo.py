"""The README's main command: `python3 devspace.py demo --once` does the round trip on the
cluster (a request from a pod answered by examples/hello/server.py here), cleans up, exits 0."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def test_demo_once_is_answered_by_the_laptop_and_cleans_up(kubeconfig):
    # -- stage 1: the command exactly as the README gives it (KUBECONFIG is set by the fixture) ---
    cp = subprocess.run(["python3", str(ROOT / "devspace.py"), "demo", "--once"], cwd=ROOT,
                        capture_output=True, text=True, timeout=380)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out

    # -- stage 2: what it reports: the cluster before, this machine during, the cluster after ---
    lines = [line for line in out.splitlines() if line.startswith("demo: ")]
    assert any("before tpenv" in line and "the cluster (pod hello-" in line for line in lines), lines
    assert any("with tpenv up" in line and "this machine: 'hello from the laptop /from-the-cluster'" in line
               for line in lines), lines
    assert any("after tpenv up stopped (exit 0): answered by the cluster" in line for line in lines), lines
    assert lines[-1] == "demo: OK: the laptop answered, and the cluster was left as it was"
