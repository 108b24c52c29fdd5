"""Host networking for the local cluster, and the guards that keep its addresses on this machine.

- The bridge `cni0` is created here with the node address 10.244.0.1/24 *before*
  anything starts: it is the node IP (API server advertise address, kubelet) and
  CoreDNS's listen address, so all of them are stable and never on eth0. The CNI
  bridge plugin adopts the existing bridge.
- `unreachable` routes for the pod /16 and the service /16: the host never sends a
  packet for them out of the default route (the connected /24 on cni0 is more
  specific, so pods stay reachable). Pods reach ClusterIPs because kube-proxy's
  DNAT happens in PREROUTING, before the routing decision.
- br_netfilter + ip_forward: a pod calling a ClusterIP backed by a pod on the same
  bridge must have the reply pass through the host's conntrack (un-DNAT).
- Chain TPENV-FORWARD, first in FORWARD: pods may talk to each other and to the host,
  never be forwarded anywhere else (no masquerade either), so turning ip_forward on
  does not give pods a way off the machine.
- /run/netns a shared mount point before containerd mounts any sandbox's network
  namespace there (:func:`_netns_dir`).
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from proc import mounts_under, run

BRIDGE = "cni0"
NODE_IP = "10.244.0.1"
POD_SUBNET = "10.244.0.0/24"  # this node's pods
POD_CIDR = "10.244.0.0/16"  # the cluster's pod range
SERVICE_CIDR = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"
GUARD_CHAIN = "TPENV-FORWARD"
NETNS_DIR = "/run/netns"  # containerd's /var/run/netns (/var/run is /run)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["ip", *args], check=check, quiet=True)


def _sysctl(key: str, value: str) -> None:
    p = Path("/proc/sys") / key.replace(".", "/")
    if not p.exists():
        raise RuntimeError(f"kernel setting {key} is missing ({p}): is br_netfilter available? (modprobe br_netfilter)")
    if p.read_text().strip() != value:
        p.write_text(value)


def setup() -> None:
    # The bridge and the node address.
    if _ip("link", "show", BRIDGE, check=False).returncode != 0:
        _ip("link", "add", BRIDGE, "type", "bridge")
    if f"{NODE_IP}/24" not in _ip("-4", "addr", "show", "dev", BRIDGE).stdout:
        _ip("addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    # Cluster ranges never leave through the default route.
    for cidr in (POD_CIDR, SERVICE_CIDR):
        _ip("route", "replace", "unreachable", cidr)
    # Same-bridge Service traffic must see conntrack; the host routes between pods.
    if not Path("/proc/sys/net/bridge").exists() and shutil.which("modprobe"):
        run(["modprobe", "br_netfilter"], check=False, quiet=True)
    _sysctl("net.bridge.bridge-nf-call-iptables", "1")
    _sysctl("net.ipv4.ip_forward", "1")
    _guard()
    _netns_dir()


def _netns_dir() -> None:
    """/run/netns as `ip netns add` leaves it: a mount point (the directory bound onto itself),
    shared, so a namespace file unmounted in one mount namespace goes in all. Made before
    containerd mounts a sandbox's namespace there, because `ip netns add` does it on its first
    use when it is not: run while the cluster runs (the e2e tests' laptop namespace, on a new
    machine), that bind hid every sandbox namespace mounted beneath it, containerd could
    neither unmount nor remove them ("remove netns: ... device or resource busy"), and their
    pods never finished terminating."""
    Path(NETNS_DIR).mkdir(parents=True, exist_ok=True)
    if NETNS_DIR not in mounts_under(NETNS_DIR):
        run(["mount", "--bind", NETNS_DIR, NETNS_DIR], quiet=True)
    run(["mount", "--make-rshared", NETNS_DIR], quiet=True)


def _ipt(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["iptables", "-w", *args], check=check, quiet=True)


def _guard() -> None:
    if _ipt("-n", "-L", GUARD_CHAIN, check=False).returncode != 0:
        _ipt("-N", GUARD_CHAIN)
    _ipt("-F", GUARD_CHAIN)
    _ipt("-A", GUARD_CHAIN, "-i", BRIDGE, "-o", BRIDGE, "-j", "RETURN")
    _ipt("-A", GUARD_CHAIN, "-i", BRIDGE, "-m", "comment", "--comment", "tpenv: pods never leave this machine",
         "-j", "REJECT")
    _ipt("-A", GUARD_CHAIN, "-o", BRIDGE, "-m", "comment", "--comment",
         "tpenv: nothing is forwarded into the pods from outside", "-j", "REJECT")
    # kube-proxy later prepends its own jumps; they only accept established flows and Service
    # traffic, so ours being second is fine: new flows off the bridge still end here.
    if _ipt("-C", "FORWARD", "-j", GUARD_CHAIN, check=False).returncode != 0:
        _ipt("-I", "FORWARD", "1", "-j", GUARD_CHAIN)


def check() -> list[str]:
    """What is wrong with the host network now (empty: all good)."""
    problems = []
    routes = _ip("route", "show", "type", "unreachable").stdout
    for cidr in (POD_CIDR, SERVICE_CIDR):
        if cidr not in routes:
            problems.append(f"unreachable route for {cidr} missing")
    if f"{NODE_IP}/24" not in _ip("-4", "addr", "show", "dev", BRIDGE, check=False).stdout:
        problems.append(f"bridge {BRIDGE} with {NODE_IP}/24 missing")
    if _ipt("-C", "FORWARD", "-j", GUARD_CHAIN, check=False).returncode != 0:
        problems.append(f"iptables FORWARD has no -j {GUARD_CHAIN}")
    if NETNS_DIR not in mounts_under(NETNS_DIR):
        problems.append(f"{NETNS_DIR} is not a mount point (`cluster up` makes it one)")
    return problems


def _flush_chains(table: str, prefixes: tuple[str, ...], ip6: bool = False) -> None:
    """Remove the jumps to, then the chains named with ``prefixes`` in ``table``."""
    def _ipt(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ip6tables" if ip6 else "iptables", "-w", *args], check=check, quiet=True)

    rules = _ipt("-t", table, "-S", check=False).stdout.splitlines()
    chains = [r.split()[1] for r in rules if r.startswith("-N ") and r.split()[1].startswith(prefixes)]
    for r in rules:
        parts = shlex.split(r)  # comments are quoted and contain spaces
        if parts[0] == "-A" and "-j" in parts and parts[parts.index("-j") + 1] in chains \
                and not parts[1].startswith(prefixes):
            _ipt("-t", table, "-D", *parts[1:], check=False)
    for c in chains:
        _ipt("-t", table, "-F", c, check=False)
    for c in chains:
        _ipt("-t", table, "-X", c, check=False)


def teardown() -> None:
    for table in ("filter", "nat", "mangle"):
        _flush_chains(table, ("KUBE-", "CNI-", "TPENV-"))
    # kube-proxy also writes IPv6 chains when the host has IPv6.
    if shutil.which("ip6tables"):
        for table in ("filter", "nat", "mangle"):
            _flush_chains(table, ("KUBE-",), ip6=True)
    for cidr in (POD_CIDR, SERVICE_CIDR):
        _ip("route", "del", "unreachable", cidr, check=False)
    # Pods' veths go with the bridge.
    _ip("link", "del", BRIDGE, check=False)
    # ip_forward and bridge-nf-call-iptables stay on: other things on the host may rely on them now.
