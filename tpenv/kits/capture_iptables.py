"""The host capture's fallback where libnftables is absent: the same redirects as iptables rules
in a chain TPENV-CONNECT of the nat table, jumped to from OUTPUT.

iptables rules have no owner, so a guard keeps the kernel-backed promise instead: a small child
process, in its own session (a Ctrl-C in the terminal does not reach it), that blocks reading a
pipe whose only writer is the tpenv process. When tpenv ends in any way, kill -9 included, the
kernel closes that pipe; the guard reads EOF, deletes the chain and exits. Should the guard itself
be killed, :func:`sweep` (``tpenv quit``, the next connect) removes what it left.

Every iptables command is bounded (``-w`` waits at most ``LOCK_WAIT`` for the xtables lock, the
process at most ``IPTABLES_TIMEOUT``): a program holding the lock makes a clear error, never a
hang. The functions block; callers on an event loop run them in a thread (capture_host.py).

    python -m tpenv.kits.capture_iptables guard   # stdin: the pipe; argv: nothing else
"""
from __future__ import annotations

import ipaddress
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from tpenv.errors import MissingTool, PermanentError, TransientError

CHAIN = "TPENV-CONNECT"
LOCK_WAIT = 5  # seconds iptables waits for the xtables lock another program holds
IPTABLES_TIMEOUT = 10.0  # seconds one iptables command may take in all


def _ipt(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(["iptables", "-w", str(LOCK_WAIT), "-t", "nat", *args], capture_output=True, text=True,
                           timeout=IPTABLES_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise TransientError(f"iptables {' '.join(args)} did not finish within {IPTABLES_TIMEOUT:.0f}s",
                             hint="another program may hold the xtables lock; try again") from e
    if check and r.returncode != 0:
        raise PermanentError(f"iptables {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def rules(proxied: list[Any], proxy_port: int, *, dns_port: int | None, nameservers: Iterable[str],
          exclude: Iterable[Any], mark: int) -> list[list[str]]:
    """The chain's rules, in order, as iptables arguments (pure)."""
    out = [["-m", "mark", "--mark", hex(mark), "-j", "RETURN"]]
    if dns_port is not None:
        for ns in nameservers:
            if ipaddress.ip_address(ns).version == 4:
                out += [["-d", f"{ns}/32", "-p", proto, "--dport", "53", "-j", "REDIRECT", "--to-ports",
                         str(dns_port)] for proto in ("udp", "tcp")]
    # After DNS, as in the nftables table: a nameserver on the API server's address stays ours.
    out += [["-d", str(ipaddress.ip_network(e, strict=False)), "-j", "RETURN"] for e in exclude]
    out += [["-d", str(n), "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(proxy_port)] for n in proxied]
    return out


def install(commands: list[list[str]]) -> None:
    if shutil.which("iptables") is None:
        raise MissingTool("neither libnftables nor iptables is installed: the host capture needs one",
                          hint="install nftables (Debian/Ubuntu: `apt-get install nftables`)")
    sweep()
    _ipt("-N", CHAIN)
    try:
        for c in commands:
            _ipt("-A", CHAIN, *c)
        _ipt("-I", "OUTPUT", "-j", CHAIN)
    except BaseException:
        sweep()
        raise


def sweep() -> list[str]:
    """Remove the chain and its jump if present; what was removed."""
    if shutil.which("iptables") is None or _ipt("-S", CHAIN, check=False).returncode != 0:
        return []
    while _ipt("-D", "OUTPUT", "-j", CHAIN, check=False).returncode == 0:
        pass
    _ipt("-F", CHAIN, check=False)
    _ipt("-X", CHAIN, check=False)
    return [f"iptables chain {CHAIN} (nat)"]


def start_guard() -> subprocess.Popen:
    """The guard, holding the read end of a pipe whose write end only this process has."""
    return subprocess.Popen([sys.executable, "-m", "tpenv.kits.capture_iptables", "guard"], stdin=subprocess.PIPE,
                            start_new_session=True)


def _guard() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # only the pipe's EOF ends it, after the cleanup
    while sys.stdin.buffer.read(4096):
        pass
    sweep()


if __name__ == "__main__" and sys.argv[1:] == ["guard"]:
    _guard()
