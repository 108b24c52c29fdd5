"""sshfs's options and pipes for a mount over a tunnel (issue 13): what it caches and how much
it moves per request. The staleness bound these set is documented in docs/design.md, "Mounts"."""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
from pathlib import Path


def sshfs_cache_options(seconds: int, read_size: int) -> list[str]:
    """sshfs options for a mount whose files may be up to ``2 * seconds + 1`` s stale (docs/design.md;
    sshfs keeps its cache times in whole seconds, hence the 1).

    sshfs's directory cache keeps the attributes a listing returned, so the stat of each listed
    file is answered locally instead of by one SFTP round trip through the tunnel (that round
    trip was the whole cost of a stat); the kernel's entry and attribute timeouts get the same
    bound, and the two layers can only add up. The cache is sized past any directory we serve:
    sshfs's default (10000 entries) evicts in the middle of a large listing.
    ``read_size``: bytes per SFTP read/write request; sshfs's 32 KiB default costs a request's
    fixed work in the agent and the pumps for every 32 KiB (sshfs 3.7 takes at most 64 KiB)."""
    sizes = [f"max_read={read_size}", f"max_write={read_size}"]
    kernel = [f"entry_timeout={seconds}", f"attr_timeout={seconds}"]
    if seconds < 1:
        return ["dir_cache=no", *kernel, *sizes]
    return ["dir_cache=yes", f"dcache_timeout={seconds}", "dcache_max_size=1000000", *kernel, *sizes]


def sshfs_mount_options(seconds: int, read_size: int) -> list[str]:
    """Every sshfs option a tpenv mount takes besides how it connects (``passive`` over our SSH
    channel; the bench's peer connects with ``directport`` and must mount the same way).
    follow_symlinks: ConfigMap, Secret and projected volumes are "..data" symlink farms; the server
    resolves them, so the handler sees plain files (and needs no readlink support)."""
    return ["follow_symlinks", *sshfs_cache_options(seconds, read_size)]


PIPE_BYTES = 1 << 20  # Linux's pipe-max-size default: what an unprivileged process may ask for


def widen_pipes(proc: asyncio.subprocess.Process) -> None:
    """sshfs's stdin/stdout pipes to 1 MiB: a 64 KiB pipe (the default) holds less than one SFTP
    read reply with its header, so each reply was two writes and a wake-up of both sides."""
    transport = getattr(proc, "_transport", None)  # asyncio keeps the pipes' transports there only
    for fd in (0, 1):
        pipe_transport = transport.get_pipe_transport(fd) if transport is not None else None
        pipe = pipe_transport.get_extra_info("pipe") if pipe_transport is not None else None
        if pipe is not None:
            with contextlib.suppress(OSError):  # above pipe-max-size or an old kernel: keep the default
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


BDI_ROOT = Path("/sys/class/bdi")


def raise_read_ahead(device: str, kb: int, root: Path = BDI_ROOT) -> tuple[int | None, str]:
    """The kernel's read-ahead of the FUSE mount on ``device`` (``major:minor``) to ``kb`` KiB.

    Why: a sequential read of an sshfs file has at most the kernel's read-ahead window in flight
    (128 KiB by default, the mount's backing-device setting), so its speed is that window per
    round trip through the tunnel, whatever the tunnel's own bandwidth (docs/performance.md, the
    SFTP mount rows). Only root may raise it (sysfs, 0644): for anyone else this says why not and
    changes nothing. Never touches the mount itself (a stat of it from the event loop would wait
    on sshfs, which waits on the loop). Returns (the value before, or None if not changed; why)."""
    path = root / device / "read_ahead_kb"
    try:
        before = int(path.read_text().strip())
    except (OSError, ValueError) as e:
        return None, f"{path} unreadable ({e.__class__.__name__})"
    if before >= kb:
        return None, f"already {before} KiB"
    try:
        path.write_text(str(kb))
    except OSError as e:  # not root, a read-only /sys (a container): the kernel's default stays
        return None, f"kept at {before} KiB: {path} not writable ({e.strerror or e.__class__.__name__})"
    return before, f"{before} -> {kb} KiB"
