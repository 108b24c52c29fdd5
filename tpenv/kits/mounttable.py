"""The mount table and short mount commands, never touching a mounted file system.

Everything here reads ``/proc`` (``/proc/self/mountinfo``, ``/proc/PID/cmdline``): a ``stat``
or ``realpath`` of a FUSE mount point asks its server, and a stuck server never answers; a
blocked call in tpenv's own process cannot be cancelled (issue #19). Commands that must touch
a mount (``fusermount3``, a probe) run as child processes that are killed after a timeout:
a process waiting on a FUSE request dies of SIGKILL.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path


def _entries(mountinfo: str = "/proc/self/mountinfo"):
    """(mount point, file system type, source, ``major:minor``) of every mount of this mount namespace."""
    with open(mountinfo, "rb") as f:
        for line in f:
            before, _, after = line.decode(errors="surrogateescape").partition(" - ")
            fields, rest = before.split(), after.split()
            if len(fields) > 4:
                yield (unescape(fields[4]), rest[0] if rest else "", unescape(rest[1]) if len(rest) > 1 else "",
                       fields[2])


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> set[str]:
    """Every mount point, as absolute paths."""
    return {point for point, *_ in _entries(mountinfo)}


def is_mounted(path: str | Path) -> bool:
    # abspath, never realpath/stat: a stat of our own FUSE mount from the event loop's thread
    # would wait for sshfs, which waits for the loop to pump its channel: a deadlock.
    target = os.path.abspath(path)
    return any(point == target for point, *_ in _entries())


def mount_entry(path: str | Path) -> tuple[str, str] | None:
    """(file system type, source) of the mount at ``path``, from mountinfo; None if not mounted."""
    target = os.path.abspath(path)
    return next(((fstype, source) for point, fstype, source, _ in _entries() if point == target), None)


def mount_device(path: str | Path, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """``major:minor`` of the mount at ``path`` (mountinfo's third field: what a stat would give as
    st_dev, without asking the file system); None if not mounted. The last entry wins, as the
    mount on top is the one a path reaches."""
    target = os.path.abspath(path)
    return ([device for point, _, _, device in _entries(mountinfo) if point == target] or [None])[-1]


def sshfs_serving(path: str | Path) -> list[int]:
    """Pids of live sshfs processes whose command line names ``path`` (from /proc, no stat)."""
    target = os.fsencode(os.path.abspath(path))
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"sshfs" and target in argv:
            pids.append(int(entry))
    return pids


def unescape(field: str) -> str:
    """mountinfo octal-escapes space, tab, newline and backslash (\\040, \\011, \\012, \\134)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


async def bounded_run(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run a short command (fusermount3, a probe) in its own session; killed after ``timeout``
    (a process blocked on a stuck FUSE mount dies of SIGKILL). (exit code or None, stderr)."""
    p = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                             stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                                             start_new_session=True)
    try:
        async with asyncio.timeout(timeout):
            _, err = await p.communicate()
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        await asyncio.shield(p.wait())
        if asyncio.current_task().cancelling():  # type: ignore[union-attr]
            raise
        return None, ""
    return p.returncode, err.decode(errors="replace").strip()


def parent_is_tpenv(pid: int) -> bool:
    """The parent of ``pid`` is a tpenv process (its sshfs is still served, not orphaned)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            return b"tpenv" in f.read()
    except (OSError, ValueError, IndexError):
        return False
