"""``tpenv-agent init --redirect APP_PORT:AGENT_PORT ...``: the in-pod redirect (docs/protocol.md §1.2).

Runs as the pod's init container ``tpenv-init`` before the app and the agent start, or as the
ephemeral container ``tpenv-redirect`` tpenv adds to the running pod (inpod.py): root,
NET_ADMIN only, in the pod's network namespace; then exits. For each port, inbound TCP to the
app's port is redirected to the agent's port, IPv4 and IPv6, in the ``nat`` table's PREROUTING
chain. PREROUTING sees only packets arriving from outside the pod (Services, headless Services,
pod IPs, the kubelet's probes), never the pod's own connections: the agent reaches the app on
127.0.0.1:APP_PORT through OUTPUT, so its passthrough is not redirected back to itself.

Idempotent: a chain of our own (``TPENV_INBOUND``) is created or flushed, then filled, and
PREROUTING jumps to it once. The nftables backend of iptables (``iptables-nft``) talks netlink,
so NET_ADMIN is the only capability needed (the legacy backend would want NET_RAW too).

IPv4 failing is fatal (exit 1, the message ends up in the pod's status): a pod whose traffic
the agent cannot take must not look injected. IPv6 failing where the pod has no IPv6 at all is
said and skipped: nothing can arrive that way.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHAIN = "TPENV_INBOUND"
BINARIES = {"ipv4": "iptables-nft", "ipv6": "ip6tables-nft"}


def _redirect(text: str) -> tuple[int, int]:
    app, _, agent = text.partition(":")
    if not (app.isdigit() and agent.isdigit()) or not (0 < int(app) < 65536 and 0 < int(agent) < 65536):
        raise argparse.ArgumentTypeError(f"want APP_PORT:AGENT_PORT, got {text!r}")
    return int(app), int(agent)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpenv-agent init",
                                description="Redirect inbound TCP to the app's ports to the agent (in-pod).")
    p.add_argument("--redirect", action="append", default=[], type=_redirect, metavar="APP_PORT:AGENT_PORT",
                   required=True)
    return p


def rules(binary: str, redirects: list[tuple[int, int]]) -> list[list[str]]:
    """The commands after the chain exists and is empty, in order (pure, for the tests)."""
    cmds = [[binary, "-w", "-t", "nat", "-A", CHAIN, "-p", "tcp", "--dport", str(app),
             "-j", "REDIRECT", "--to-ports", str(agent)] for app, agent in redirects]
    return cmds


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def apply(binary: str, redirects: list[tuple[int, int]]) -> None:
    """Create/flush the chain, fill it, jump to it from PREROUTING once. Raises RuntimeError."""
    nat = [binary, "-w", "-t", "nat"]
    if _run(nat + ["-N", CHAIN]).returncode != 0:  # exists already (the init container ran before)
        _check(_run(nat + ["-F", CHAIN]), "flush chain " + CHAIN)
    for cmd in rules(binary, redirects):
        _check(_run(cmd), " ".join(cmd[3:]))
    jump = ["PREROUTING", "-p", "tcp", "-j", CHAIN]
    if _run(nat + ["-C", *jump]).returncode != 0:
        _check(_run(nat + ["-A", *jump]), "jump from PREROUTING")


def _check(r: subprocess.CompletedProcess, what: str) -> None:
    if r.returncode != 0:
        raise RuntimeError(f"{what}: exit {r.returncode}: {(r.stderr or r.stdout).strip()}")


def has_ipv6() -> bool:
    try:
        with open("/proc/sys/net/ipv6/conf/all/disable_ipv6") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    said = {"redirects": [f"{a}->{b}" for a, b in args.redirect]}
    try:
        apply(BINARIES["ipv4"], args.redirect)
    except (RuntimeError, OSError) as e:
        print(f"tpenv-agent init: cannot redirect the app's ports to the agent (IPv4): {e}", file=sys.stderr)
        return 1
    said["ipv4"] = "ok"
    try:
        apply(BINARIES["ipv6"], args.redirect)
        said["ipv6"] = "ok"
    except (RuntimeError, OSError) as e:
        if has_ipv6():
            print(f"tpenv-agent init: cannot redirect the app's ports to the agent (IPv6): {e}", file=sys.stderr)
            return 1
        said["ipv6"] = "skipped: the pod has no IPv6"
    print(json.dumps({"init": said, "pid": os.getpid()}), flush=True)
    return 0
