"""`tpenv-agent init` for real, in two network namespaces joined by a veth pair: the pod's and a
caller's. Inbound TCP to the app's port reaches the agent's port; the pod's own connections to
the app (loopback, as the agent's passthrough makes them, or its own address) are not
redirected; running it twice (an init container run again) leaves one rule.

Needs root and iproute2 + iptables (Debian; `python3 devspace.py test` installs them).
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "agent"
SERVE = """
import socket, sys, threading
def serve(port, name):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", port)); s.listen()
    while True:
        c, _ = s.accept(); c.sendall(name.encode()); c.close()
threads = [threading.Thread(target=serve, args=(p, n), daemon=True) for p, n in ((8080, "app"), (7900, "agent"))]
[t.start() for t in threads]
print("up", flush=True)
sys.stdin.read()
"""
DIAL = "import socket, sys; s = socket.create_connection((sys.argv[1], 8080), 5); print(s.recv(16).decode())"


def _need() -> None:
    if os.geteuid() != 0:
        pytest.fail("the in-pod redirect test needs root (network namespaces, iptables)", pytrace=False)
    for tool, pkg in (("ip", "iproute2"), ("iptables-nft", "iptables")):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: apt-get install {pkg} (python3 devspace.py test installs it)",
                        pytrace=False)


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns():
    """(pod namespace, caller namespace, pod address): a veth pair on a private /30."""
    _need()
    tag = "".join(random.choices("abcdefghij", k=5))
    pod, caller, a, b = f"tpr-{tag}-p", f"tpr-{tag}-c", f"tpr{tag}a", f"tpr{tag}b"
    net = f"10.251.{random.randrange(1, 250)}"
    run("ip", "netns", "add", pod)
    run("ip", "netns", "add", caller)
    try:
        run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        run("ip", "link", "set", a, "netns", pod)
        run("ip", "link", "set", b, "netns", caller)
        for ns, dev, addr in ((pod, a, f"{net}.1/30"), (caller, b, f"{net}.2/30")):
            run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        yield pod, caller, f"{net}.1"
    finally:
        subprocess.run(["ip", "netns", "del", pod], capture_output=True)
        subprocess.run(["ip", "netns", "del", caller], capture_output=True)


def init(ns: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tpenv_agent", "init",
                           "--redirect", "8080:7900"], capture_output=True, text=True, cwd=AGENT,
                          env={**os.environ, "PYTHONPATH": str(AGENT)})


def test_inbound_goes_to_the_agent_and_the_pods_own_connections_do_not(netns):
    pod, caller, addr = netns
    # Stage 1: the init step, twice (idempotent: one jump, one rule).
    for _ in range(2):
        cp = init(pod)
        assert cp.returncode == 0, cp.stderr
        assert '"ipv4": "ok"' in cp.stdout
    rules = run("ip", "netns", "exec", pod, "iptables-nft", "-t", "nat", "-S")
    assert rules.count("-j TPENV_INBOUND") == 1 and rules.count("--to-ports 7900") == 1, rules
    # Stage 2: an app on 8080 and an agent on 7900 in the pod; who answers which caller.
    servers = subprocess.Popen(["ip", "netns", "exec", pod, sys.executable, "-c", SERVE], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert servers.stdout.readline().strip() == "up"

        def dial(ns: str, host: str) -> str:
            return run("ip", "netns", "exec", ns, sys.executable, "-c", DIAL, host).strip()

        assert dial(caller, addr) == "agent"  # from outside the pod: redirected
        assert dial(pod, "127.0.0.1") == "app"  # the agent's passthrough: not redirected
        assert dial(pod, addr) == "app"  # the pod to itself never passes PREROUTING
    finally:
        servers.stdin.close()
        servers.wait(10)


def test_refuses_bad_arguments_without_touching_anything(netns):
    pod, _, _ = netns
    cp = subprocess.run(["ip", "netns", "exec", pod, sys.executable, "-m", "tpenv_agent", "init",
                         "--redirect", "8080"], capture_output=True, text=True, cwd=AGENT,
                        env={**os.environ, "PYTHONPATH": str(AGENT)})
    assert cp.returncode == 2 and "APP_PORT:AGENT_PORT" in cp.stderr
    assert "TPENV_INBOUND" not in run("ip", "netns", "exec", pod, "iptables-nft", "-t", "nat", "-S")
