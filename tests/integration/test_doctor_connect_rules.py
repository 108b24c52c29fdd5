"""tpenv doctor on what a crashed host-mode `tpenv connect` leaves, for real: in a private network
namespace standing for the developer's machine (root; the cluster is not needed), an unowned
nftables table ``ip tpenv`` and the iptables fallback's chain TPENV-CONNECT are made as a crash
of connect and of its guard would leave them; doctor names both with their fix, ``--fix`` removes
both and lists them, and a second run finds nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.capture_kit import netns, sh, state
from tpenv.kits import nft as nftkit

TPENV = Path(sys.executable).parent / "tpenv"
pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
def machine():
    assert os.geteuid() == 0, "network namespaces need root: run this test as root"
    assert nftkit.available(), nftkit.INSTALL_HINT
    with netns("tpd") as ns:
        yield ns


def doctor(ns: str, home: Path, *args: str) -> dict:
    """`tpenv -o json doctor` run inside ``ns``, with no kubeconfig (the cluster part fails: only
    the machine part is looked at here) and a session directory of its own (no session runs)."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "KUBECONFIG": str(home / "none"),
           "TPENV_SESSION_STATE_DIR": str(home / "sessions")}
    cp = subprocess.run(["ip", "netns", "exec", ns, str(TPENV), "-o", "json", "doctor", *args], env=env,
                        capture_output=True, text=True, timeout=90)
    try:
        return json.loads(cp.stdout)
    except ValueError:
        pytest.fail(f"doctor printed no report (exit {cp.returncode}):\n{cp.stdout}\n{cp.stderr}", pytrace=False)


def rules_check(report: dict) -> dict:
    return next(c for c in report["checks"] if c["name"] == "machine/connect-rules")


def test_doctor_fix_removes_a_dead_connects_table_and_chain(machine, tmp_path):
    # Stage 1: what a crash leaves: a table without the owner flag, and the fallback's chain still
    # jumped to from OUTPUT (its guard killed too), redirecting a "cluster" range to a dead proxy.
    sh("ip", "netns", "exec", machine, "nft", "add table ip tpenv")
    for rule in (["-N", "TPENV-CONNECT"],
                 ["-A", "TPENV-CONNECT", "-d", "10.199.0.0/16", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "1"],
                 ["-I", "OUTPUT", "-j", "TPENV-CONNECT"]):
        sh("ip", "netns", "exec", machine, "iptables", "-w", "-t", "nat", *rule)
    before = state(machine)
    assert "table ip tpenv {" in before["nft"] and "-A OUTPUT -j TPENV-CONNECT" in before["iptables"]

    # Stage 2: doctor names both, with the commands that remove them, and says --fix can.
    found = rules_check(doctor(machine, tmp_path))
    assert found["status"] == "fail" and found["fixable"], found
    assert "nftables table ip tpenv (no owner)" in found["detail"]
    assert "iptables chain TPENV-CONNECT (nat)" in found["detail"]
    assert "nft delete table ip tpenv" in found["fix"] and "iptables -t nat -X TPENV-CONNECT" in found["fix"]

    # Stage 3: --fix removes both and lists them.
    report = doctor(machine, tmp_path, "--fix")
    found = rules_check(report)
    assert found["status"] == "ok" and found["detail"].startswith("repaired: "), found
    assert sorted(found["changed"]) == ["removed iptables chain TPENV-CONNECT (nat)",
                                        "removed nftables table ip tpenv"]
    assert set(found["changed"]) <= set(report["changed"])
    after = state(machine)
    assert "table ip tpenv" not in after["nft"] and "TPENV-CONNECT" not in after["iptables"]

    # Stage 4: a second run finds nothing left.
    found = rules_check(doctor(machine, tmp_path))
    assert found["status"] == "ok" and not found["fixable"] and "outlived" in found["detail"], found
