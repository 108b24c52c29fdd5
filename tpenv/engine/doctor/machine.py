"""Doctor's checks of this machine: what tpenv runs locally (sshfs/FUSE, Python and libraries),
what `connect` needs (nftables or iptables, user namespaces, TUN), and what a crash leaves
behind (session files of dead processes, sshfs mounts whose process is gone, connect rules).

Each check is cheap (a file read, a PATH lookup, one short subprocess) so the whole group runs in
well under a second; the repairs touch only what is provably stale (a dead pid's files, a mount
that answers ENOTCONN, a table whose owner is gone).
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
from tpenv.settings import Settings

MIN_PYTHON = (3, 11)
# The libraries whose versions matter to a bug report; minimums come from tpenv's own metadata.
LIBRARIES = ("pydantic", "ruamel.yaml", "kubernetes", "asyncssh", "watchfiles", "jinja2", "websockets", "h2")
# The nftables tables `tpenv connect` (host capture) creates start with this; doctor lists the
# ones whose owner process is gone. Extend leftover_connect_tables() when connect names more.
CONNECT_TABLE_PREFIX = "tpenv"


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
    if not Path("/proc/self/ns/user").exists():
        return Outcome(WARN, "this kernel has no user namespaces: `tpenv connect` ns mode is unavailable",
                       fix="use connect's host mode (root) or env mode")
    if problems:
        return Outcome(WARN, "; ".join(problems) + ": `tpenv connect` ns mode (no root) is unavailable",
                       fix=" && ".join(fixes))
    return Outcome(OK, "unprivileged user namespaces allowed")


async def tun_device() -> Outcome:
    if Path("/dev/net/tun").exists():
        return Outcome(OK, "/dev/net/tun")
    return Outcome(WARN, "/dev/net/tun is missing (VPN-style capture unavailable)",
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


def _is_dead_mount(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.EIO)
    return False


async def stale_mounts() -> Outcome:
    mounts = _fuse_mounts()
    dead = [m for m in await asyncio.to_thread(lambda: [m for m in mounts if _is_dead_mount(m)])]
    if not dead:
        return Outcome(OK, f"{len(mounts)} sshfs mount(s), none stale")

    async def unmount() -> list[str]:
        changed = []
        for m in dead:
            proc = await asyncio.create_subprocess_exec("fusermount3", "-uz", m, stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.DEVNULL)
            if await proc.wait() == 0:
                changed.append(f"unmounted {m}")
        return changed
    return Outcome(FAIL, f"sshfs mount(s) whose connection is gone: {', '.join(dead)}",
                   fix=" && ".join(f"fusermount3 -uz {m}" for m in dead), repair=unmount)


async def _nft(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec("nft", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    return out.decode(errors="replace")


async def leftover_connect_tables() -> list[str]:
    """nftables tables named by tpenv connect and not owned by a live process. An owned table
    (``flags owner``) vanishes with the process that made it, so it is never a leftover; an
    unowned one outlives a kill -9 and keeps redirecting traffic to a proxy that is gone."""
    if not shutil.which("nft"):
        return []
    tables = []
    for line in (await _nft("list", "tables")).splitlines():
        parts = line.split()  # "table inet tpenv-connect-1234"
        if len(parts) == 3 and parts[0] == "table" and parts[2].startswith(CONNECT_TABLE_PREFIX):
            if "flags owner" not in await _nft("list", "table", parts[1], parts[2]):
                tables.append(f"{parts[1]} {parts[2]}")
    return tables


def connect_rules(running_sessions: int) -> Check:
    async def check() -> Outcome:
        if not shutil.which("nft"):
            return Outcome(SKIP, "nft not installed: no connect rules to look at")
        if os.geteuid() != 0:
            return Outcome(SKIP, "reading nftables needs root")
        tables = await leftover_connect_tables()
        if not tables:
            return Outcome(OK, "no tpenv nftables table outlived its process")
        if running_sessions:
            return Outcome(OK, f"{', '.join(tables)} (a tpenv session is running)")
        return Outcome(FAIL, f"nftables tables of a tpenv connect that is gone: {', '.join(tables)}",
                       fix=" && ".join(f"nft delete table {t}" for t in tables))
    return check


def machine_checks(settings: Settings) -> list[tuple[str, Check]]:
    state_dir = Path(settings.session.state_dir).expanduser()
    # Counted here, not with statusd.find_sessions: that one deletes stale files, which the
    # sessions check must see to report them.
    running = len(_live_sessions(state_dir)) if state_dir.exists() else 0
    return [("machine/python", python_and_libraries), ("machine/sshfs", sshfs_fuse),
            ("machine/firewall", firewall_tools), ("machine/userns", user_namespaces), ("machine/tun", tun_device),
            ("machine/sessions", session_state(state_dir)), ("machine/mounts", stale_mounts),
            ("machine/connect-rules", connect_rules(running))]


def _live_sessions(state_dir: Path) -> list[Path]:
    stale = set(_stale_session_files(state_dir))
    return [p for p in state_dir.glob("*.json") if p not in stale]
