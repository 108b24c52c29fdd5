"""tpenv doctor's machine checks in their failing cases, with the probes faked (the files under
/proc and /dev, PATH, the installed versions, the firewall): each names the problem and its fix.
Their healthy cases run for real in tests/e2e/test_doctor.py; the connect rules' repair runs for
real in a network namespace in tests/integration/test_doctor_connect_rules.py."""
from __future__ import annotations

import importlib.metadata as md
import ipaddress
import socket
from types import SimpleNamespace

import pytest

from tpenv.engine.doctor import FAIL, OK, SKIP, WARN, repair, run_check
from tpenv.engine.doctor import cluster, machine
from tpenv.errors import MissingTool
from tpenv.kits import capture_host


def fake_proc(monkeypatch, values: dict[str, str]) -> None:
    monkeypatch.setattr(machine, "_read", lambda path: values.get(path))


# --- stage 1: user namespaces, AppArmor, TUN, firewall tools ------------------------------------------------------

@pytest.mark.parametrize("path,value,said,fix", [
    ("/proc/sys/kernel/unprivileged_userns_clone", "0", "kernel.unprivileged_userns_clone = 0",
     "sysctl -w kernel.unprivileged_userns_clone=1"),
    ("/proc/sys/user/max_user_namespaces", "0", "user.max_user_namespaces = 0",
     "sysctl -w user.max_user_namespaces=15000"),
    ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1", "AppArmor restricts unprivileged user namespaces",
     "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"),
])
async def test_user_namespaces_refused_is_a_warning_with_the_sysctl(monkeypatch, path, value, said, fix):
    fake_proc(monkeypatch, {path: value})
    found = await run_check("machine/userns", machine.user_namespaces)
    assert found.status == WARN and said in found.detail and "ns mode (no root) is unavailable" in found.detail
    assert fix in found.fix


async def test_a_kernel_without_user_namespaces_points_at_the_other_modes(monkeypatch, tmp_path):
    fake_proc(monkeypatch, {})
    monkeypatch.setattr(machine, "USERNS", str(tmp_path / "absent"))
    found = await run_check("machine/userns", machine.user_namespaces)
    assert found.status == WARN and "no user namespaces" in found.detail and "host mode" in found.fix


async def test_no_tun_device_is_a_warning_with_modprobe(monkeypatch, tmp_path):
    monkeypatch.setattr(machine, "TUN_DEVICE", str(tmp_path / "tun"))
    found = await run_check("machine/tun", machine.tun_device)
    assert found.status == WARN and "is missing" in found.detail and found.fix.startswith("modprobe tun")
    (tmp_path / "tun").write_text("")
    assert (await run_check("machine/tun", machine.tun_device)).status == OK


async def test_neither_nft_nor_iptables_is_a_warning_naming_what_still_works(monkeypatch):
    monkeypatch.setattr(machine.shutil, "which", lambda tool, *a, **kw: None)
    found = await run_check("machine/firewall", machine.firewall_tools)
    assert found.status == WARN and "ns and env modes still work" in found.detail
    assert found.fix == "apt-get install nftables"


# --- stage 2: sshfs/FUSE, Python and libraries ---------------------------------------------------------------------

async def test_sshfs_absent_fails_with_the_install_and_the_sync_way_out(monkeypatch):
    def absent():
        raise MissingTool("sshfs is not installed", hint="apt-get install sshfs; or --mount-mode sync")
    monkeypatch.setattr(machine, "check_fuse", absent)
    found = await run_check("machine/sshfs", machine.sshfs_fuse)
    assert (found.status, found.detail, found.fix) == (FAIL, "sshfs is not installed",
                                                       "apt-get install sshfs; or --mount-mode sync")


async def test_fusermount_absent_fails(monkeypatch):
    monkeypatch.setattr(machine, "check_fuse", lambda: "/usr/bin/sshfs")
    monkeypatch.setattr(machine.shutil, "which", lambda tool, *a, **kw: None)
    found = await run_check("machine/sshfs", machine.sshfs_fuse)
    assert found.status == FAIL and "fusermount3 is not installed" in found.detail and "fuse3" in found.fix


async def test_an_old_or_missing_library_fails_with_the_upgrade(monkeypatch):
    real = md.version

    def version(lib):
        if lib == "h2":
            raise md.PackageNotFoundError(lib)
        return "1.0" if lib == "pydantic" else real(lib)
    monkeypatch.setattr(machine.md, "version", version)
    monkeypatch.setattr(machine, "_minimums", lambda: {"pydantic": "2.5"})
    found = await run_check("machine/python", machine.python_and_libraries)
    assert found.status == FAIL and "pydantic 1.0 < 2.5" in found.detail and "h2 missing" in found.detail
    assert found.fix.startswith("pip install --upgrade tpenv")


async def test_an_old_python_fails(monkeypatch):
    monkeypatch.setattr(machine, "MIN_PYTHON", (99, 0))
    found = await run_check("machine/python", machine.python_and_libraries)
    assert found.status == FAIL and "tpenv needs 99.0 or newer" in found.detail and "install Python" in found.fix


# --- stage 3: stale sshfs mounts --------------------------------------------------------------------------------------

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
90 22 0:50 / /home/dev/api\\040vol rw,nosuid,nodev shared:60 - fuse.sshfs tpenv:/ rw,user_id=0
91 22 0:51 / /home/dev/live rw,nosuid,nodev shared:61 - fuse.sshfs tpenv:/ rw,user_id=0
92 22 0:52 / /run/other rw - fuse.rclone remote: rw
"""


async def test_a_dead_sshfs_mount_fails_with_its_unmount(monkeypatch):
    # How each mount answers is faked here (a real dead and a real stuck one:
    # tests/integration/test_doctor_mounts.py); what the check makes of the answers is not.
    fake_proc(monkeypatch, {"/proc/self/mountinfo": MOUNTINFO})
    assert machine._fuse_mounts() == ["/home/dev/api vol", "/home/dev/live"]
    states = {"/home/dev/api vol": "dead", "/home/dev/live": "ok"}

    async def mount_state(path, timeout):
        return states[path]
    monkeypatch.setattr(machine, "_mount_state", mount_state)
    found = await run_check("machine/mounts", machine.stale_mounts(5.0))
    assert found.status == FAIL and "/home/dev/api vol" in found.detail and "/home/dev/live" not in found.detail
    assert "connection is gone" in found.detail and "not answering" not in found.detail
    assert found.fix == "fusermount3 -uz /home/dev/api vol" and found.fixable
    # A stuck one is named as such, with the same lazy unmount as its fix; none: ok.
    states["/home/dev/live"] = "stuck"
    found = await run_check("machine/mounts", machine.stale_mounts(5.0))
    assert "not answering within 5s" in found.detail and "/home/dev/live" in found.detail
    assert found.fix == "fusermount3 -uz /home/dev/api vol && fusermount3 -uz /home/dev/live"
    states.update({"/home/dev/api vol": "ok", "/home/dev/live": "ok"})
    assert (await run_check("machine/mounts", machine.stale_mounts(5.0))).status == OK


# --- stage 4: connect's leftover rules (nftables and the iptables fallback) -----------------------------------------

@pytest.fixture
def firewall(monkeypatch):
    """Fake probes of both backends, as root; ``swept`` records the repair's sweep."""
    state = SimpleNamespace(tables=[], chain=False, swept=0)
    monkeypatch.setattr(machine.os, "geteuid", lambda: 0)
    monkeypatch.setattr(machine, "_nft_tables", lambda: state.tables)
    monkeypatch.setattr(machine, "_iptables_chain", lambda: state.chain)

    def sweep():
        state.swept += 1
        removed = ["nftables table ip tpenv" for t in state.tables
                   if (t["family"], t["name"]) == ("ip", "tpenv") and "owner" not in t["flags"]]
        removed += ["iptables chain TPENV-CONNECT (nat)"] if state.chain else []
        state.tables, state.chain = [], False
        return removed
    monkeypatch.setattr(capture_host, "sweep", sweep)
    return state


async def test_leftover_table_and_chain_fail_and_fix_sweeps_them(firewall):
    firewall.tables = [{"family": "ip", "name": "tpenv", "flags": []}, {"family": "inet", "name": "fw", "flags": []}]
    firewall.chain = True
    found = await run_check("machine/connect-rules", machine.connect_rules(0))
    assert found.status == FAIL and found.fixable
    assert "nftables table ip tpenv (no owner)" in found.detail and "iptables chain TPENV-CONNECT" in found.detail
    assert "inet fw" not in found.detail
    assert "nft delete table ip tpenv" in found.fix and "iptables -t nat -X TPENV-CONNECT" in found.fix
    await repair([found])
    assert firewall.swept == 1 and found.status == OK
    assert found.changed == ["removed nftables table ip tpenv", "removed iptables chain TPENV-CONNECT (nat)"]
    assert (await run_check("machine/connect-rules", machine.connect_rules(0))).status == OK


async def test_the_iptables_chain_alone_is_found_without_nftables(firewall, monkeypatch):
    monkeypatch.setattr(machine, "_nft_tables", lambda: None)  # no libnftables: the fallback's chain
    firewall.chain = True
    found = await run_check("machine/connect-rules", machine.connect_rules(0))
    assert found.status == FAIL and "iptables chain TPENV-CONNECT" in found.detail


async def test_a_live_connects_rules_are_not_leftovers(firewall):
    firewall.tables = [{"family": "ip", "name": "tpenv", "flags": ["owner"]}]
    assert (await run_check("machine/connect-rules", machine.connect_rules(0))).status == OK
    firewall.chain = True  # the iptables fallback of a running session: its guard removes it
    found = await run_check("machine/connect-rules", machine.connect_rules(1))
    assert found.status == OK and not found.fixable and "a tpenv session is running" in found.detail


async def test_no_backend_or_no_root_skips(firewall, monkeypatch):
    monkeypatch.setattr(machine, "_nft_tables", lambda: None)
    monkeypatch.setattr(machine, "_iptables_chain", lambda: None)
    assert (await run_check("machine/connect-rules", machine.connect_rules(0))).status == SKIP
    monkeypatch.setattr(machine.os, "geteuid", lambda: 1000)
    assert "needs root" in (await run_check("machine/connect-rules", machine.connect_rules(0))).detail


# --- stage 5: a cluster range overlapping a local route -----------------------------------------------------------

def route_line(iface: str, net: str, flags: int = 0x0001) -> str:
    n = ipaddress.IPv4Network(net)
    hexa = lambda a: f"{socket.htonl(int(a)):08X}"  # noqa: E731 - /proc/net/route: host order of network bytes
    return f"{iface}\t{hexa(n.network_address)}\t00000000\t{flags:04X}\t0\t0\t0\t{hexa(n.netmask)}\t0\t0\t0"


ROUTES = "\n".join([
    "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT",
    route_line("eth0", "0.0.0.0/0", 0x0003),  # default: not a conflict
    route_line("eth0", "192.168.1.0/24"),
    route_line("tun0", "10.100.0.0/16"),  # a VPN's route inside 10.96.0.0/12
    route_line("lo", "10.200.0.0/16", 0x0201),  # unreachable (reject): tpenv's own guard routes
    route_line("cni0", "10.244.0.0/24"),  # a node's pod interface
]) + "\n"


def test_local_routes_from_proc_net_route():
    assert [(str(n), i) for n, i in cluster.local_routes(ROUTES)] == [("192.168.1.0/24", "eth0"),
                                                                       ("10.100.0.0/16", "tun0")]


class ClusterRanges:
    """Answers list nodes (pod CIDRs) and list servicecidrs."""

    api = None
    core = SimpleNamespace(list_node=None)

    async def call(self, fn, *, what):
        if what.resource == "nodes":
            return {"items": [{"spec": {"podCIDRs": ["10.244.0.0/24"]}}]}
        return {"items": [{"spec": {"cidrs": ["10.96.0.0/12"]}}]}


async def test_a_service_range_overlapping_a_vpn_route_is_a_warning(monkeypatch):
    real = cluster.local_routes
    monkeypatch.setattr(cluster, "local_routes", lambda: real(ROUTES))
    found = await run_check("cluster/cidrs", cluster.cidr_overlap(ClusterRanges()))
    assert found.status == WARN
    assert "10.96.0.0/12 overlaps 10.100.0.0/16 (dev tun0)" in found.detail and "cni0" not in found.detail
    assert "connect from a network without that route" in found.fix
    monkeypatch.setattr(cluster, "local_routes", lambda: real(ROUTES.replace(route_line("tun0", "10.100.0.0/16"),
                                                                             route_line("tun0", "172.16.0.0/16"))))
    assert (await run_check("cluster/cidrs", cluster.cidr_overlap(ClusterRanges()))).status == OK
