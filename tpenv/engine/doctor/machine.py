"""Doctor's checks of this machine: what tpenv runs locally (sshfs/FUSE, Python and libraries),
what `connect` needs (nftables or iptables, user namespaces, TUN), and what a crash leaves
behind (session files of dead processes, sshfs mounts whose process is gone, connect rules).

Each check is cheap (a file read, a PATH lookup, one short subprocess) so the whole group runs in
well under a second; the repairs touch only what is provably stale (a dead pid's files, a mount
that answers ENOTCONN, connect's nftables table or iptables chain while no session runs: the
same sweep `tpenv quit` does).
"""
from __future__ import annotations

import asyncio
import errno
import importlib.metadata as md
import os
import re
import shutil
import sys
from pathlib import Path

from tpenv.engine.doctor import FAIL, OK, SKIP, WARN, Check, Outcome
from tpenv.engine.mounts import check_fuse
from tpenv.errors import MissingTool
from tpenv.kits.mounttable import bounded_run
from tpenv.settings import Settings

MIN_PYTHON = (3, 11)
USERNS = "/proc/self/ns/user"  # absent: the kernel has no user namespaces
TUN_DEVICE = "/dev/net/tun"
# The libraries whose versions matter to a bug report; minimums come from tpenv's own metadata.
LIBRARIES = ("pydantic", "ruamel.yaml", "kubernetes", "asyncssh", "watchfiles", "jinja2", "websockets", "h2")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _minimums() -> dict[str, str]:
    """``{library: minimum}`` from tpenv's installed requirements (``name>=x.y``)."""
    out = {}
    try:
        requires = md.requires("tpenv") or []
    except md.PackageNotFoundError:
        return out
    for req in requires:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9.]+)\s*$", req)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


async def python_and_libraries() -> Outcome:
    py = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info < MIN_PYTHON:
        return Outcome(FAIL, f"Python {py}; tpenv needs {'.'.join(map(str, MIN_PYTHON))} or newer",
                       fix="install Python 3.11+ and reinstall tpenv with it (pip install .)")
    mins, seen, bad = _minimums(), [], []
    for lib in LIBRARIES:
        try:
            have = md.version(lib)
        except md.PackageNotFoundError:
            bad.append(f"{lib} missing")
            continue
        seen.append(f"{lib} {have}")
        want = mins.get(lib.lower())
        if want and _version_tuple(have) < _version_tuple(want):
            bad.append(f"{lib} {have} < {want}")
    if bad:
        return Outcome(FAIL, f"Python {py}; " + ", ".join(bad), fix="pip install --upgrade tpenv (or: pip install .)")
    return Outcome(OK, f"Python {py}; " + ", ".join(seen))


async def sshfs_fuse() -> Outcome:
    try:
        path = check_fuse()
    except MissingTool as e:
        return Outcome(FAIL, e.message, fix=e.hint)
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if not fusermount:
        return Outcome(FAIL, "fusermount3 is not installed: sshfs mounts cannot be unmounted",
                       fix="apt-get install fuse3; or copy the volumes instead: --mount-mode sync")
    return Outcome(OK, f"{path}, {fusermount}, /dev/fuse")


async def firewall_tools() -> Outcome:
    found = [t for t in ("nft", "iptables") if shutil.which(t)]
    if not found:
        return Outcome(WARN, "neither nft nor iptables is installed: `tpenv connect` in host mode cannot capture "
                             "traffic (ns and env modes still work)", fix="apt-get install nftables")
    return Outcome(OK, ", ".join(shutil.which(t) or t for t in found))


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


async def user_namespaces() -> Outcome:
    """Unprivileged user namespaces: `tpenv connect` ns mode (no root) needs them."""
    problems, fixes = [], []
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        problems.append("kernel.unprivileged_userns_clone = 0")
        fixes.append("sysctl -w kernel.unprivileged_userns_clone=1")
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        problems.append("user.max_user_namespaces = 0")
        fixes.append("sysctl -w user.max_user_namespaces=15000")
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        problems.append("AppArmor restricts unprivileged user namespaces "
                        "(kernel.apparmor_restrict_unprivileged_userns = 1)")
        fixes.append("sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 (or an AppArmor profile allowing "
                     "userns for python3)")
    if not Path(USERNS).exists():
        return Outcome(WARN, "this kernel has no user namespaces: `tpenv connect` ns mode is unavailable",
                       fix="use connect's host mode (root) or env mode")
    if problems:
        return Outcome(WARN, "; ".join(problems) + ": `tpenv connect` ns mode (no root) is unavailable",
                       fix=" && ".join(fixes))
    return Outcome(OK, "unprivileged user namespaces allowed")


async def tun_device() -> Outcome:
    if Path(TUN_DEVICE).exists():
        return Outcome(OK, TUN_DEVICE)
    return Outcome(WARN, f"{TUN_DEVICE} is missing (VPN-style capture unavailable)",
                   fix="modprobe tun; in a container: --device /dev/net/tun")


def _stale_session_files(state_dir: Path) -> list[Path]:
    """Session files (json + socket) whose process is gone: what kill -9 leaves."""
    import json

    from tpenv.engine.statusd import _pid_alive

    stale: list[Path] = []
    for path in sorted(state_dir.glob("*.json")):
        try:
            info = json.loads(path.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half-written or foreign: not ours to judge
        if not _pid_alive(pid):
            stale.append(path)
            sock = Path(info.get("socket") or path.with_suffix(".sock"))
            if sock.exists():
                stale.append(sock)
    return stale


def session_state(state_dir: Path) -> Check:
    async def check() -> Outcome:
        if not state_dir.exists():
            return Outcome(OK, f"{state_dir} (no sessions yet)")
        stale = _stale_session_files(state_dir)
        if not stale:
            return Outcome(OK, f"{state_dir}: no stale session files")

        async def remove() -> list[str]:
            changed = []
            for p in stale:
                try:
                    p.unlink()
                    changed.append(f"removed {p}")
                except FileNotFoundError:
                    continue
            return changed
        # Harmless (status/list skip them), hence a warning; kill -9 is the usual cause.
        return Outcome(WARN, f"{len(stale)} file(s) of sessions whose process is gone in {state_dir}",
                       fix="rm " + " ".join(str(p) for p in stale), repair=remove)
    return check


def _fuse_mounts() -> list[str]:
    """Mount points of sshfs (fuse.sshfs) mounts, from /proc/self/mountinfo."""
    out = []
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype = right.split()[0] if right else ""
        if len(fields) >= 5 and fstype == "fuse.sshfs":
            out.append(fields[4].replace("\\040", " "))
    return out


# A stat in a child process: a stuck sshfs (stopped, or its other end gone quiet) holds every
# process that touches its mount, in an uninterruptible wait. A thread of ours stuck there could
# never be joined, and Python joins its threads at exit: doctor printed its report, then hung.
_STAT = "import os, sys\ntry:\n    os.stat(sys.argv[1])\nexcept OSError as e:\n    sys.exit(e.errno % 256 or 1)\n"


async def _mount_state(path: str, timeout: float) -> str:
    """``ok``, ``dead`` (its sshfs is gone: ENOTCONN or EIO) or ``stuck`` (no answer in ``timeout``)."""
    code, _ = await bounded_run([sys.executable, "-I", "-S", "-c", _STAT, path], timeout)
    if code is None:
        return "stuck"
    return "dead" if code in (errno.ENOTCONN, errno.EIO) else "ok"


def stale_mounts(timeout: float) -> Check:
    async def check() -> Outcome:
        mounts = _fuse_mounts()
        states = dict(zip(mounts, await asyncio.gather(*(_mount_state(m, timeout) for m in mounts))))
        dead = [m for m in mounts if states[m] == "dead"]
        stuck = [m for m in mounts if states[m] == "stuck"]
        if not dead and not stuck:
            return Outcome(OK, f"{len(mounts)} sshfs mount(s), none stale")

        async def unmount() -> list[str]:
            changed = []
            for m in dead + stuck:  # lazy: detaching never waits on the file system
                code, _ = await bounded_run(["fusermount3", "-uz", m], timeout)
                if code == 0:
                    changed.append(f"unmounted {m}")
            return changed
        said = [f"sshfs mount(s) whose connection is gone: {', '.join(dead)}"] if dead else []
        said += [f"sshfs mount(s) not answering within {timeout:g}s (a process touching one hangs): "
                 f"{', '.join(stuck)}"] if stuck else []
        return Outcome(FAIL, "; ".join(said), fix=" && ".join(f"fusermount3 -uz {m}" for m in dead + stuck),
                       repair=unmount)
    return check


def _nft_tables() -> list[dict] | None:
    """This network namespace's nftables tables (family, name, flags) through libnftables, as
    connect itself reads them; None where libnftables is absent (no `nft` binary is needed)."""
    from tpenv.kits import nft as nftkit

    if not nftkit.available():
        return None
    with nftkit.Nft() as nft:
        return nft.tables()


def _iptables_chain() -> bool | None:
    """Whether the iptables fallback's chain exists (nat table); None without iptables."""
    from tpenv.kits import capture_iptables

    if not shutil.which("iptables"):
        return None
    return capture_iptables._ipt("-S", capture_iptables.CHAIN, check=False).returncode == 0


def connect_leftovers() -> tuple[list[str], list[str], bool]:
    """(what a host-mode connect left, the fix commands, whether any backend was readable).

    The nftables table ``ip tpenv`` is created owned (``flags owner``): the kernel deletes it with
    its process, so an owned one is a live connect's and only an unowned one is left over. The
    iptables fallback's chain TPENV-CONNECT has no owner: its guard process removes it, and when
    the guard was killed too, it stays and keeps redirecting cluster ranges to a proxy that is gone.
    """
    from tpenv.kits import capture_host, capture_iptables

    found, fixes = [], []
    tables, chain = _nft_tables(), _iptables_chain()
    for t in tables or []:
        if (t["family"], t["name"]) == (capture_host.FAMILY, capture_host.TABLE) and "owner" not in t["flags"]:
            found.append(f"nftables table {t['family']} {t['name']} (no owner)")
            fixes.append(f"nft delete table {t['family']} {t['name']}")
    if chain:
        c = capture_iptables.CHAIN
        found.append(f"iptables chain {c} (nat)")
        fixes.append(f"iptables -t nat -D OUTPUT -j {c}; iptables -t nat -F {c}; iptables -t nat -X {c}")
    return found, fixes, tables is not None or chain is not None


def connect_rules(running_sessions: int) -> Check:
    async def check() -> Outcome:
        if os.geteuid() != 0:
            return Outcome(SKIP, "reading nftables and iptables needs root (so does connect's host mode, which "
                                 "makes them)")
        found, fixes, readable = await asyncio.to_thread(connect_leftovers)
        if not readable:
            return Outcome(SKIP, "neither libnftables nor iptables is installed: no connect rules can exist")
        if not found:
            return Outcome(OK, "no nftables table or iptables chain of a tpenv connect outlived its process")
        if running_sessions:
            # The iptables chain of a running connect (its guard is alive) looks the same: never swept here.
            return Outcome(OK, f"{', '.join(found)}: a tpenv session is running (`tpenv quit` ends it)")

        async def remove() -> list[str]:
            from tpenv.kits.capture_host import sweep

            return [f"removed {what}" for what in await asyncio.to_thread(sweep)]
        return Outcome(FAIL, f"rules of a tpenv connect that is gone (they redirect the cluster's ranges to a "
                             f"proxy that no longer runs): {', '.join(found)}",
                       fix=" && ".join(fixes) + "   (or: tpenv quit)", repair=remove)
    return check


def machine_checks(settings: Settings) -> list[tuple[str, Check]]:
    state_dir = Path(settings.session.state_dir).expanduser()
    # Counted here, not with statusd.find_sessions: that one deletes stale files, which the
    # sessions check must see to report them.
    running = len(_live_sessions(state_dir)) if state_dir.exists() else 0
    return [("machine/python", python_and_libraries), ("machine/sshfs", sshfs_fuse),
            ("machine/firewall", firewall_tools), ("machine/userns", user_namespaces), ("machine/tun", tun_device),
            ("machine/sessions", session_state(state_dir)),
            ("machine/mounts", stale_mounts(settings.mounts.probe_timeout)),
            ("machine/connect-rules", connect_rules(running))]


def _live_sessions(state_dir: Path) -> list[Path]:
    stale = set(_stale_session_files(state_dir))
    return [p for p in state_dir.glob("*.json") if p not in stale]
