"""Remote volumes on a local directory: sshfs in passive mode over an SSH ``sftp`` channel.

``sshfs -o passive`` speaks SFTP on its stdin/stdout instead of starting ``ssh``; we connect
those pipes to an SSH channel for the agent's ``sftp`` subsystem (chrooted at the agent's
``/tpenv/mounts``), so the app's mount paths appear under the local directory, read-write
(docs/protocol.md §6). sshfs runs in the foreground (``-f``) as our child: we own its life.

Readiness is an event, not a poll: the kernel flags ``/proc/self/mountinfo`` (POLLPRI/POLLERR)
whenever the mount table changes; the event loop watches that file descriptor and re-reads it.

Liveness is a probe, as a kubelet's is (a stuck FUSE server sends no event): every
``probe_interval`` a child process ``statfs``es the mount; the sshfs process being stopped,
or the probe taking longer than ``probe_timeout``, fails the unit with the reason and abandons
the mount (sshfs killed, which aborts every request waiting on it; lazy unmount), so a stuck
mount costs one failed unit, never the session (issue #19). Nothing here touches the mount
from tpenv's own process: a stuck FUSE call cannot be cancelled, only a process killed.

``rewrite_env`` is the IRSA case of seed 004: path-valued variables (a token file named by
``AWS_WEB_IDENTITY_TOKEN_FILE``) are prefixed with the mount root so they open locally.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Awaitable, Callable

from tpenv.config.models import MOUNT_MODES
from tpenv.engine.units import State, UnitState
from tpenv.kits.mounttable import (bounded_run, is_mounted, mount_device, mount_entry, parent_is_tpenv,
                                   sshfs_serving)
from tpenv.kits.sshfs import raise_read_ahead, sshfs_mount_options, widen_pipes
from tpenv.errors import MissingTool, TpenvError, TransientError, UsageError
from tpenv.settings import Settings

log = logging.getLogger("tpenv.mounts")

# (writer, reader) of an SSH channel running the agent's sftp subsystem, bytes mode.
OpenSftp = Callable[[], Awaitable[tuple[Any, Any]]]
MOUNT_TIMEOUT = 30.0


# Said whenever sshfs cannot run: sync mode is the way without FUSE, but never chosen silently
# (a copy is not a mount: big volumes, second-long lag).
_OR_SYNC = ("; or copy the volumes instead: --mount-mode sync (mount: {mode: sync} in telepresence.yaml); "
            "or run with --mount false")


def check_fuse() -> str:
    """Path of sshfs, or MissingTool saying what to install (sshfs, /dev/fuse), or to use sync mode."""
    sshfs = shutil.which("sshfs")
    if not sshfs:
        raise MissingTool("sshfs is not installed: remote volumes cannot be mounted",
                          hint="install it (Debian/Ubuntu: apt-get install sshfs; macOS: macFUSE + "
                               "gromgit/fuse/sshfs-mac)" + _OR_SYNC)
    if not os.path.exists("/dev/fuse"):
        raise MissingTool("/dev/fuse is missing: the kernel's FUSE is not available here",
                          hint="load it (modprobe fuse), or in a container pass --device /dev/fuse" + _OR_SYNC)
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MissingTool("/dev/fuse is not accessible to this user",
                          hint="add yourself to the group owning /dev/fuse" + _OR_SYNC)
    return sshfs


# Units whose default mount was skipped and said so: once per process, not at every pod restart.
_SKIPPED_SAID: set[tuple] = set()


def skip_default_mount(mode: str, explicit: bool, mounts: list[str], log: Any, *, key: tuple) -> bool:
    """True when a mount nobody asked for (no ``--mount``, no ``mount:``) is left out because
    sshfs or FUSE is missing here, said once with how to get it: the default must not cost the
    intercept. An explicit mount is never skipped (its start() fails with check_fuse's error)."""
    if explicit or mode != "auto":
        return False
    try:
        check_fuse()
    except MissingTool as e:
        if key not in _SKIPPED_SAID:
            _SKIPPED_SAID.add(key)
            log.warning("the app's volumes (%s) are not mounted: %s. To mount them: %s",
                        ", ".join(mounts), e.message, e.hint)
        return True
    return False


def make_mount(mode: str, session: Any, path: str | Path | None, mounts: list[str], *, name: str,
               settings: Settings) -> "SshfsMount | Any":
    """The mount unit for ``mount.mode``: sync → a synced copy (syncmount.SyncMount); sshfs and
    auto → sshfs, whose start() says what is missing (and that sync mode exists) without FUSE."""
    if mode not in MOUNT_MODES:
        raise UsageError(f"unknown mount mode {mode!r}: expected one of {', '.join(MOUNT_MODES)}")
    if mode == "sync":
        from tpenv.engine.syncmount import SyncMount

        return SyncMount(session.sftp, path, mounts, name=name, settings=settings)
    return SshfsMount(session.open_sftp_channel, path, name=name, settings=settings)


def rewrite_env(env: dict[str, str], names: list[str], mount_root: str) -> dict[str, str]:
    """Prefix the values of ``names`` (absolute paths in the pod) with the local mount root."""
    out = dict(env)
    root = mount_root.rstrip("/")
    for name in names:
        value = out.get(name)
        if value and value.startswith("/"):
            out[name] = root + value
    return out


async def _wait_mounted(path: str, proc: asyncio.subprocess.Process, timeout: float) -> int | None:
    """Until ``path`` is a mount point (mountinfo change events: None), sshfs exits (its exit
    code), or the timeout (TimeoutError)."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    fd = os.open("/proc/self/mountinfo", os.O_RDONLY)
    loop.add_reader(fd, changed.set)
    exited = asyncio.ensure_future(proc.wait())
    try:
        async with asyncio.timeout(timeout):
            while True:
                # Reading the file to its end re-arms the kernel's change notification.
                os.lseek(fd, 0, os.SEEK_SET)
                while os.read(fd, 65536):
                    pass
                changed.clear()
                if is_mounted(path):
                    return None
                waiter = asyncio.ensure_future(changed.wait())
                done, _ = await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if exited in done:
                    return proc.returncode
    finally:
        loop.remove_reader(fd)
        os.close(fd)
        if not exited.done():
            exited.cancel()


class SshfsMount:
    """One sshfs mount of the agent's volumes; a unit with start/stop/health.

    ``path``: the local directory (created if missing; must be empty). None: a fresh temp dir, like
    Telepresence's ``telfs-*``."""

    def __init__(self, open_sftp: OpenSftp, path: str | Path | None, *, name: str,
                 key: tuple = (), extra_options: list[str] | None = None, settings: Settings | None = None,
                 remote: str = "/") -> None:
        self.open_sftp = open_sftp
        m = (settings or Settings()).mounts  # none given: the documented defaults, never others
        self.probe_interval, self.probe_timeout = m.probe_interval, m.probe_timeout
        self.unmount_timeout = m.unmount_timeout
        self.read_ahead_kb = m.read_ahead_kb
        self.remote = remote  # the agent's SFTP root; tests mount a local sftp-server's directory
        self.name = name
        self.key = key or ("mount", name)
        self._given = Path(path) if path is not None else None
        self.path: Path | None = None
        self._created_dir = False
        self._options = ["passive", *sshfs_mount_options(m.cache_seconds, m.read_size),
                         *(extra_options or [])]  # cache_seconds: the staleness bound (docs/design.md)
        self._proc: asyncio.subprocess.Process | None = None
        self._channel: tuple[Any, Any] | None = None
        self._pumps: list[asyncio.Task] = []
        self._state = UnitState()
        self._stopped = False
        self._stderr = b""
        self._probe: asyncio.Task | None = None

    def health(self) -> UnitState:
        if self._state.state is State.READY and self._proc is not None and self._proc.returncode is not None:
            self._state.set(State.FAILED, error=f"sshfs exited ({self._proc.returncode})")
        return self._state

    async def start(self) -> None:
        sshfs = check_fuse()
        self._state.set(State.STARTING)
        if self._given is None:
            self.path = Path(os.path.realpath(tempfile.mkdtemp(prefix="telfs-")))
            self._created_dir = True
        else:
            given = self._given.expanduser().absolute()
            # Resolve symlinks of the parent now, before anything is mounted (see is_mounted).
            self.path = Path(os.path.realpath(given.parent)) / given.name
            # The mount table first: a stat of a leftover, dead mount would hang or fail.
            if is_mounted(self.path):
                await self._clear_leftover()
            if self.path.exists() and not self.path.is_dir():
                raise UsageError(f"mount point {self.path} exists and is not a directory")
            if self.path.is_dir() and any(self.path.iterdir()):
                raise UsageError(f"mount point {self.path} is not empty",
                                 hint="give an empty or new directory with --mount DIR")
            if not self.path.exists():
                self.path.mkdir(parents=True)
                self._created_dir = True
        try:
            writer, reader = await self.open_sftp()
            self._channel = (writer, reader)
            self._proc = await asyncio.create_subprocess_exec(
                sshfs, "-f", "-o", ",".join(self._options), f"tpenv-agent:{self.remote}", str(self.path),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)  # a Ctrl-C to our group must not kill sshfs before we unmount
            widen_pipes(self._proc)
            self._pumps = [asyncio.ensure_future(self._pump(reader, self._proc.stdin, close=True)),
                           asyncio.ensure_future(self._pump(self._proc.stdout, writer, close=False)),
                           asyncio.ensure_future(self._collect_stderr())]
            exit_code = await _wait_mounted(str(self.path), self._proc, MOUNT_TIMEOUT)
        except TimeoutError as e:
            await self._cleanup()
            raise TransientError(f"[mount/{self.name}] sshfs did not mount {self.path} within {MOUNT_TIMEOUT:.0f}s") \
                from e
        except BaseException:
            await self._cleanup()
            raise
        if exit_code is not None:
            await self._cleanup()
            text = self._stderr.decode(errors="replace").strip()
            raise TransientError(f"[mount/{self.name}] sshfs exited ({exit_code}) before mounting: "
                                 f"{text or 'no output'}")
        await self._read_ahead()
        log.info("[mount/%s] volumes mounted at %s", self.name, self.path)
        self._state.set(State.READY, detail=str(self.path))
        self._probe = asyncio.ensure_future(self._probe_loop())

    async def _read_ahead(self) -> None:
        """Before the handler opens anything: a file's read-ahead is fixed when it is opened.
        After FUSE's INIT exchange, which the kernel ends by lowering the read-ahead to what sshfs
        answered (the kernel's own 128 KiB, as proposed): the mount is in mountinfo before that
        answer, so a write at once was undone (tests/e2e/test_intercept_env_mount.py saw 128).
        A statfs waits for INIT like any FUSE request; the liveness probe's, in a child process."""
        device = mount_device(self.path) if self.read_ahead_kb else None
        if device is None:
            return
        why_not = await self.check()
        if why_not is not None:  # the probe loop will say it again and act on it
            log.debug("[mount/%s] kernel read-ahead left: %s", self.name, why_not)
            return
        before, why = raise_read_ahead(device, self.read_ahead_kb)
        log.log(logging.INFO if before is not None else logging.DEBUG, "[mount/%s] kernel read-ahead: %s",
                self.name, why)

    # -- liveness -------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _sshfs_stopped(self) -> bool:
        """sshfs is stopped (SIGSTOP, a debugger): the state letter in /proc/PID/stat is T or t."""
        if self._proc is None or self._proc.returncode is not None:
            return False
        try:
            stat = Path(f"/proc/{self._proc.pid}/stat").read_bytes()
        except OSError:
            return False
        return stat[stat.rfind(b")") + 2:][:1] in (b"T", b"t")

    async def check(self) -> str | None:
        """One liveness probe: None when the mount answers, else why not."""
        if self._sshfs_stopped():
            return f"sshfs (pid {self.pid}) is stopped"
        assert self.path is not None
        code, err = await bounded_run(["stat", "-f", "-c", "%T", str(self.path)], self.probe_timeout)
        if code is None:
            return f"a statfs of {self.path} did not answer within {self.probe_timeout:.0f}s"
        if code != 0:
            return f"a statfs of {self.path} failed: {err or f'exit {code}'}"
        return None

    async def _probe_loop(self) -> None:
        # A periodic probe by design: a stuck FUSE server emits no event to wait for.
        while not self._stopped:
            await asyncio.sleep(self.probe_interval)
            if self._stopped or self._state.state is not State.READY:
                return
            why = await self.check()
            if why is None or self._stopped:
                continue
            log.warning("[mount/%s] not responding: %s; abandoning it (sshfs killed, lazy unmount)", self.name, why)
            self._state.set(State.FAILED, error=f"not responding: {why}; unmounted", detail=str(self.path))
            await self._cleanup(stuck=True)
            return

    async def _clear_leftover(self) -> None:
        """``path`` is already mounted. An sshfs mount of ours whose sshfs is gone (tpenv was
        killed with -9 while the mount was stuck) is unmounted, and said; anything else is refused."""
        assert self.path is not None
        entry = mount_entry(self.path)
        users = sshfs_serving(self.path)
        orphans = [pid for pid in users if not parent_is_tpenv(pid)]  # its tpenv was killed
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        users = [pid for pid in users if pid not in orphans]
        if entry is None or entry[0] != "fuse.sshfs" or not entry[1].startswith("tpenv-agent:") or users:
            raise UsageError(f"{self.path} is already a mount point" + (f" (sshfs pid {users[0]} serves it)"
                                                                        if users else ""),
                             hint=f"stop the session using it, or unmount it: fusermount3 -u {self.path}")
        code, err = await bounded_run(["fusermount3", "-uz", str(self.path)], self.unmount_timeout)
        if code != 0 or is_mounted(self.path):
            raise UsageError(f"{self.path} is still mounted by an earlier session that is gone: {err or 'timed out'}",
                             hint=f"unmount it: fusermount3 -uz {self.path}")
        log.warning("[mount/%s] unmounted %s, left behind by an earlier session that ended without unmounting",
                    self.name, self.path)

    async def _pump(self, src: Any, dst: Any, *, close: bool) -> None:
        try:
            while True:
                data = await src.read(262144)  # a whole SFTP reply (read_size and a header) in one step
                if not data:
                    break
                dst.write(data)
                if hasattr(dst, "drain"):
                    await dst.drain()
        except (ConnectionError, BrokenPipeError, OSError, TpenvError) as e:
            log.debug("[mount/%s] pump ended: %r", self.name, e)
        except Exception as e:  # noqa: BLE001 - asyncssh channel errors; the mount's health reports it
            log.debug("[mount/%s] pump ended: %r", self.name, e)
        finally:
            if close:
                with contextlib.suppress(Exception):
                    dst.close()
            elif not self._stopped and self._state.state is State.READY:
                self._state.set(State.FAILED, error="the sftp channel closed")

    async def _collect_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while line := await self._proc.stderr.readline():
            self._stderr = (self._stderr + line)[-4096:]
            log.debug("[mount/%s] sshfs: %s", self.name, line.decode(errors="replace").rstrip())

    async def stop(self) -> None:
        """Unmount (lazily if the directory is busy), end sshfs and the channel. Safe twice."""
        if self._stopped:
            return
        self._stopped = True
        self._state.set(State.STOPPING)
        await self._cleanup()
        self._state.set(State.STOPPED)

    async def _cleanup(self, *, stuck: bool = False) -> None:
        """Unmount and end sshfs; every step bounded, so a stuck mount cannot hold a stop.
        ``stuck``: sshfs is killed first, which fails every request waiting on the mount."""
        if self._probe is not None and self._probe is not asyncio.current_task():
            self._probe.cancel()
        stuck = stuck or self._sshfs_stopped()
        if stuck:
            self._kill_sshfs()
        if self.path is not None and is_mounted(self.path):
            for args in (["-u"], ["-uz"]):  # -z: lazy, when a handler still has a file open
                code, err = await bounded_run(["fusermount3", *args, str(self.path)], self.unmount_timeout)
                if code == 0:
                    break
                log.debug("[mount/%s] fusermount3 %s: %s", self.name, args, err or "timed out")
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
                self._proc.send_signal(signal.SIGCONT)  # a stopped sshfs acts on SIGTERM only once continued
            try:
                async with asyncio.timeout(self.unmount_timeout):
                    await self._proc.wait()
            except TimeoutError:
                self._kill_sshfs()
                await self._proc.wait()
        for t in self._pumps:
            t.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self._pumps = []
        if self._channel is not None:
            with contextlib.suppress(Exception):
                self._channel[0].close()
            self._channel = None
        if self._created_dir and self.path is not None and not is_mounted(self.path):
            with contextlib.suppress(OSError):
                self.path.rmdir()

    def _kill_sshfs(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    def abort(self) -> None:
        """Second Ctrl-C: kill sshfs (a dead FUSE server fails every waiting request) and detach
        the mount now. Synchronous; the lazy unmount never waits on the file system."""
        self._stopped = True
        running = self._proc is not None and self._proc.returncode is None
        self._kill_sshfs()
        mounted = self.path is not None and is_mounted(self.path)
        if mounted:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["fusermount3", "-uz", str(self.path)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=self.unmount_timeout)
        if running or mounted:  # said: the forced exit leaves no other trace of what it did
            log.warning("[mount/%s] forced: sshfs killed, %s detached (lazy unmount)", self.name, self.path)

    async def __aenter__(self) -> "SshfsMount":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
