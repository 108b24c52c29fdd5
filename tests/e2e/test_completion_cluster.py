"""Completion values from the cluster, through real bash, and `kubectl tpenv` as a kubectl plugin
(kubectl finds `kubectl-tpenv` on PATH and runs it with the rest of the line)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_intercept_kit import deploy_hello
from tests.cluster.pytest_plugin import kubectl_binary
from tests.unit.test_completion import bash_complete

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]
BIN = Path(sys.executable).parent


def test_bash_completes_workloads_and_namespaces_from_the_cluster(namespace, tmp_path, monkeypatch):
    ns = namespace
    deploy_hello(ns)
    # bash_complete's environment points KUBECONFIG at nothing; here it is the cluster's.
    monkeypatch.setattr("tests.unit.test_completion.env", lambda tmp: {
        "PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(tmp), "KUBECONFIG": os.environ["KUBECONFIG"],
        "TPENV_SESSION_STATE_DIR": str(tmp / "sessions")})
    # Stage 1: workload names for intercept's WORKLOAD and uninstall --agent, in the namespace of -n.
    assert bash_complete(f"tpenv intercept -n {ns} he", tmp_path) == ["hello"]
    assert bash_complete(f"tpenv -n {ns} uninstall --agent ", tmp_path) == ["hello"]
    # Stage 2: namespaces for -n.
    assert bash_complete(f"tpenv list -n {ns[:-2]}", tmp_path) == [ns]


def test_kubectl_plugin(namespace, tmp_path):
    ns = namespace
    deploy_hello(ns)
    plugin = BIN / "kubectl-tpenv"
    if not plugin.exists():
        pytest.fail("kubectl-tpenv is not installed: run python3 devspace.py setup (pyproject's scripts)",
                    pytrace=False)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "TPENV_SESSION_STATE_DIR": str(tmp_path)}
    listed = subprocess.run([kubectl_binary(), "plugin", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert str(plugin) in listed.stdout, listed.stdout + listed.stderr
    cp = subprocess.run([kubectl_binary(), "tpenv", "list", "-n", ns], env=env, capture_output=True, text=True,
                        timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines() == ["hello: ready to intercept (traffic-agent not yet installed)"]
