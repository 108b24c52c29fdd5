"""The host capture (tpenv/kits/capture_host.py) on real nftables, in a private network namespace
standing for the developer's machine (root; the cluster is not needed): what it redirects, what it
leaves alone, and that kill -9 of its process leaves nothing behind, by the kernel's hand.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.pytest_plugin import wait_until
from tests.integration.capture_kit import netns, sh, state
from tpenv.kits import nft as nftkit

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (run as root)")]


@pytest.fixture
def machine():
    """A namespace with a route for the "cluster" range 10.199.0.0/16 and for 10.198.0.0/16 (not
    proxied), as a laptop's default route would give; source 127.0.0.1 so answers come back."""
    assert nftkit.available(), nftkit.INSTALL_HINT
    with netns() as ns:
        for cidr in ("10.199.0.0/16", "10.198.0.0/16"):
            sh("ip", "-n", ns, "route", "add", cidr, "dev", "lo", "src", "127.0.0.1")
        yield ns


def start_capture(ns: str, *cidrs: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.integration.capture_kit", "host",
                             *cidrs], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the kit prints "ready PORT" once the table is in place
    assert line.startswith("ready "), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, int(line.split()[1])


def curl(ns: str, url: str) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, "curl", "-sS", "-m", "10", url, check=False)


def test_the_proxied_range_is_captured_with_its_original_destination(machine):
    # Stage 1: before the capture, nothing answers on the "cluster" address.
    assert curl(machine, "http://10.199.3.4:8080/").returncode != 0
    proc, port = start_capture(machine, "10.199.0.0/16")
    try:
        # Stage 2: the callback is handed the address and port the client dialled.
        assert curl(machine, "http://10.199.3.4:8080/").stdout == "captured 10.199.3.4:8080\n"
        assert curl(machine, "http://10.199.0.9/").stdout == "captured 10.199.0.9:80\n"
        # Stage 3: outside the range, nothing is redirected (no listener there: refused/timeout).
        assert "captured" not in curl(machine, "http://10.198.0.9:8080/").stdout
        # Stage 4: the table is owned (the kernel's guarantee) and holds only our chain.
        ruleset = state(machine)["nft"]
        assert "table ip tpenv" in ruleset and "flags owner" in ruleset and f"redirect to :{port}" in ruleset
    finally:
        proc.kill()
        proc.wait()


def test_kill_9_leaves_nothing_behind(machine):
    before = state(machine)
    proc, _ = start_capture(machine, "10.199.0.0/16")
    assert state(machine)["nft"] != before["nft"]
    # kill -9: no handler runs, only the kernel cleans up (the table dies with its netlink socket).
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The process's sockets are closed before it is reaped, so the state is back at once: no wait.
    assert state(machine) == before
    assert curl(machine, "http://10.199.3.4:8080/").returncode != 0


def test_the_iptables_fallback_is_removed_by_its_guard_after_kill_9(machine):
    # Where libnftables is absent: iptables rules, with a guard process waiting on a pipe from tpenv.
    before = state(machine)
    proc, port = start_capture(machine, "--backend=iptables", "10.199.0.0/16")
    assert curl(machine, "http://10.199.3.4:8080/").stdout == "captured 10.199.3.4:8080\n"
    assert f"--to-ports {port}" in state(machine)["iptables"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The guard saw its pipe close (the kernel closes it with the killed process) and cleaned up;
    # the promise is "within a second".
    wait_until("the guard removing the rules", lambda: "TPENV-CONNECT" not in state(machine)["iptables"], 1.0,
               interval=0.05)
    # Every rule and chain it added is gone, not only the jump; what stays is the empty built-in nat
    # table iptables creates on first use (policy ACCEPT, no rule), which iptables cannot remove.
    after = state(machine)
    assert {k: v for k, v in after.items() if k not in ("iptables", "nft")} == \
        {k: v for k, v in before.items() if k not in ("iptables", "nft")}
    assert not [line for line in after["iptables"].splitlines() if line.startswith(("-A", ":TPENV"))], after
    assert "tpenv" not in after["nft"].lower() and "jump" not in after["nft"] and "redirect" not in after["nft"]
    assert curl(machine, "http://10.199.3.4:8080/").returncode != 0


def test_sweep_removes_a_leftover_table_and_refuses_a_live_one(machine):
    # A table without the owner flag (what an older tpenv or a hand-made rule would leave).
    sh("ip", "netns", "exec", machine, "nft", "add table ip tpenv")
    code = "from tpenv.kits.capture_host import sweep; print(sweep())"
    out = sh("ip", "netns", "exec", machine, sys.executable, "-c", code).stdout
    assert out.strip() == "['nftables table ip tpenv']"
    assert "tpenv" not in state(machine)["nft"]
    assert sh("ip", "netns", "exec", machine, sys.executable, "-c", code).stdout.strip() == "[]"
    # A live capture's table is another session's: sweep says so and leaves it.
    proc, _ = start_capture(machine, "10.199.0.0/16")
    try:
        r = sh("ip", "netns", "exec", machine, sys.executable, "-c", code, check=False)
        assert r.returncode != 0 and "another `tpenv connect` holds" in r.stderr
        assert "table ip tpenv" in state(machine)["nft"]
    finally:
        proc.kill()
        proc.wait()
