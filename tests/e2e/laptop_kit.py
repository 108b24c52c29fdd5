"""The developer's machine for the connect e2e tests: a network namespace that reaches the API
server and nothing of the cluster's pod or service ranges, except through tpenv.

    with Laptop.create(kubeconfig) as laptop:
        laptop.run("curl", "-sS", "http://hello.ns/")       # fails: nothing routes it
        laptop.kubeconfig                                     # the API server at the host's veth address
        laptop.snapshot()                                     # nft, iptables, links, addrs, routes, resolv.conf

How (root): a veth pair in a private /30 of 169.254.128.0/17 (link-local: never routed, clear of
169.254.169.254 and of docs/cluster.md's 10.244.0.0/16 and 10.96.0.0/16). The laptop's default
route points at the host, as a laptop's points at its router (so tpenv sees no route colliding
with the cluster's ranges). Two locks keep everything but the API server out of reach:
- the laptop's firewall (table ``inet laptop``, filter ``output``) rejects whatever would leave
  on the veth for any address but the host's end: a pod IP or a ClusterIP fails at once
  (connection refused), and nothing reaches the host's PREROUTING, where kube-proxy's DNAT would
  otherwise turn ``10.96.0.1:443`` into the local API server. tpenv's captures redirect in the
  nat ``output`` hook, which runs first; the filter hook still sees the first route's device
  (``oifname`` is fixed for the whole hook traversal), hence the exception for loopback
  destinations, which is what a redirected packet has by then;
- the host's end has IPv4 forwarding off: the host delivers to its own address there (the API
  server listens on all of them) but routes nothing from the laptop anywhere, off the machine
  least of all.
Its resolv.conf (``/etc/netns/<name>/resolv.conf``, which
``ip netns exec`` mounts) names the host's veth address, where nothing serves DNS: outside names
fail locally. The kubeconfig keeps the admin credentials with ``tls-server-name: kubernetes`` (a
name in the API server's certificate), the address being the host's end of the veth.

Stale laptops: a run stopped hard (the CI runner killed, a test timed out under kill -9) never
reaches the ``finally`` that deletes its namespace, and a process still inside it (a host-mode
connect) keeps the namespace, its veth pair and its /30 alive. ``Laptop.create`` first sweeps
every laptop whose owner (the pid recorded in ``/run/tpenv-laptops/<name>``, with its start time,
so a reused pid does not count) is gone: the processes left inside are killed, the namespace,
its ``/etc/netns`` directory and any host-side ``tplh*`` veth without a peer are deleted. A live
laptop of another test run on this shared machine is left alone.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML

POOL = ipaddress.ip_network("169.254.128.0/17")
# Who made each laptop: not in /etc/netns/<name>/, whose every file `ip netns exec` mounts over /etc.
OWNERS = Path("/run/tpenv-laptops")


def sh(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): with the pid, who it is for sure."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


UNOWNED_GRACE = 1800.0  # s: longer than any test's timeout (900 s)


def _owner_alive(etc: Path) -> bool:
    try:
        pid, started = (OWNERS / etc.name).read_text().split()
    except (OSError, ValueError):
        # A laptop of a kit from before owners were recorded (another checkout on this shared
        # machine), or half made: stale only once older than any test could be.
        made = [p.stat().st_mtime for p in (etc, Path("/run/netns") / etc.name) if p.exists()]
        return bool(made) and time.time() - max(made) < UNOWNED_GRACE
    return _start_time(int(pid)) == started


def sweep_stale() -> list[str]:
    """Remove the laptops whose owner is gone (see the module's doc); what was removed."""
    removed = []
    names = {line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.startswith("tpl-")}
    names |= {p.name for p in Path("/etc/netns").glob("tpl-*")} if Path("/etc/netns").is_dir() else set()
    for name in sorted(names):
        etc = Path("/etc/netns") / name
        if _owner_alive(etc):
            continue
        for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", name, check=False)
        shutil.rmtree(etc, ignore_errors=True)
        (OWNERS / name).unlink(missing_ok=True)
        removed.append(name)
    # A namespace deleted by name but held by a process inside keeps its veth pair: the host's end
    # names it (tplh<suffix> for tpl-<suffix>); deleting that end deletes the pair.
    for line in sh("ip", "-o", "link", "show", "type", "veth").stdout.splitlines():
        dev = line.split(":")[1].strip().split("@")[0]
        if dev.startswith("tplh") and not _owner_alive(Path("/etc/netns") / f"tpl-{dev[4:]}"):
            sh("ip", "link", "del", dev, check=False)
            removed.append(dev)
    return removed


def _free_slash30() -> ipaddress.IPv4Network:
    used = sh("ip", "-o", "-4", "addr").stdout
    for _ in range(100):
        first = POOL.network_address + 4 * secrets.randbelow(POOL.num_addresses // 4)
        net = ipaddress.ip_network(f"{first}/30")
        if not any(f"inet {a}/" in used for a in net):
            return net
    raise AssertionError("no free /30 in 169.254.128.0/17 for the laptop namespace")


@dataclass
class Laptop:
    name: str
    host_ip: str
    laptop_ip: str
    kubeconfig: Path
    dir: Path

    @classmethod
    @contextlib.contextmanager
    def create(cls, kubeconfig: str | Path, workdir: Path):
        if os.geteuid() != 0:
            import pytest  # the kit is also imported outside pytest; only this check needs it

            pytest.fail("the laptop network namespace (ip netns, veth, nftables) needs root: run the tests "
                        "as root, as the README's `python3 devspace.py test` does", pytrace=False)
        stale = sweep_stale()
        if stale:
            print(f"laptop kit: removed stale laptops of an earlier run: {', '.join(stale)}")
        suffix = secrets.token_hex(3)
        name, host_if, laptop_if = f"tpl-{suffix}", f"tplh{suffix}", f"tpll{suffix}"
        net = _free_slash30()
        host_ip, laptop_ip = (str(a) for a in list(net.hosts())[:2])
        etc = Path("/etc/netns") / name
        etc.mkdir(parents=True, exist_ok=True)
        OWNERS.mkdir(parents=True, exist_ok=True)
        (OWNERS / name).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        sh("ip", "netns", "add", name)
        try:
            # IPv4 only: an IPv6 link-local address would still be settling (DAD "tentative")
            # when a test takes its first snapshot.
            sh("ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1")
            # The wire: the host's end, forwarding off on it, so nothing from the laptop is routed.
            sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", laptop_if, "netns", name)
            sh("sysctl", "-q", "-w", f"net.ipv4.conf.{host_if}.forwarding=0")
            sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
            sh("ip", "link", "set", host_if, "up")
            # The laptop: its end, a default route to the host, and its firewall.
            for args in (("link", "set", "lo", "up"), ("addr", "add", f"{laptop_ip}/30", "dev", laptop_if),
                         ("link", "set", laptop_if, "up"), ("route", "add", "default", "via", host_ip)):
                sh("ip", "-n", name, *args)
            firewall = ("table inet laptop {\n chain output {\n  type filter hook output priority 0; policy accept;\n"
                        f'  oifname "{laptop_if}" ip daddr != {{ {host_ip}, 127.0.0.0/8 }} reject\n'
                        f'  oifname "{laptop_if}" ip6 daddr != ::1 reject\n }}\n}}\n')
            sh("ip", "netns", "exec", name, "nft", "-f", "-", input=firewall)
            (etc / "resolv.conf").write_text(f"nameserver {host_ip}\n")
            workdir.mkdir(parents=True, exist_ok=True)
            laptop = cls(name, host_ip, laptop_ip, workdir / "kubeconfig", workdir)
            laptop._write_kubeconfig(Path(kubeconfig))
            yield laptop
        finally:
            # Whatever a test left inside (a connect it could not stop) would keep the namespace alive.
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", name, check=False)  # takes the veth pair with it
            shutil.rmtree(etc, ignore_errors=True)
            (OWNERS / name).unlink(missing_ok=True)

    def _write_kubeconfig(self, source: Path) -> None:
        yaml = YAML()
        doc = yaml.load(source.read_text())
        for c in doc["clusters"]:
            c["cluster"]["server"] = f"https://{self.host_ip}:6443"
            c["cluster"]["tls-server-name"] = "kubernetes"
        with self.kubeconfig.open("w") as f:
            yaml.dump(doc, f)
        self.kubeconfig.chmod(0o644)

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = False, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return sh(*self.argv(*args), check=check, timeout=timeout, **kw)

    def curl(self, url: str, *extra: str) -> subprocess.CompletedProcess:
        return self.run("curl", "-sS", "-m", "15", *extra, url, timeout=60)

    def snapshot(self) -> dict[str, str]:
        """All a connect could change on the laptop: rules, links, addresses, routes, resolver files."""
        return {"nft": self.run("nft", "list", "ruleset").stdout, "iptables": self.run("iptables-save").stdout,
                "links": self.run("ip", "-o", "link").stdout, "addrs": self.run("ip", "-o", "addr").stdout,
                "routes": self.run("ip", "route", "show", "table", "all").stdout,
                "rules": self.run("ip", "rule").stdout,
                "resolv.conf": self.run("cat", "/etc/resolv.conf").stdout,
                "hosts": self.run("cat", "/etc/hosts").stdout}


class UpstreamDns:
    """The laptop's usual nameserver (what its resolv.conf names: the host's veth address, on this
    machine): answers every A query with OUTSIDE_ANSWER, a TEST-NET address nobody dials, and
    records the names it was asked, so a test can tell which names left for the usual resolver."""

    OUTSIDE_ANSWER = "192.0.2.10"

    def __init__(self, host_ip: str) -> None:
        import socketserver
        import threading

        import dns.message
        import dns.rrset

        self.asked: list[str] = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                q = dns.message.from_wire(data)
                name = q.question[0].name
                outer.asked.append(name.to_text().rstrip("."))
                r = dns.message.make_response(q)
                if q.question[0].rdtype == 1:  # A
                    r.answer.append(dns.rrset.from_text(name, 30, "IN", "A", outer.OUTSIDE_ANSWER))
                sock.sendto(r.to_wire(), self.client_address)

        self.server = socketserver.ThreadingUDPServer((host_ip, 53), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
