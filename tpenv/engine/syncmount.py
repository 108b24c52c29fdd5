"""Sync mode: the app's volumes as a local copy kept in step with the pod, where FUSE is missing.

Instead of a FUSE mount (mounts.SshfsMount), an SFTP client on the agent's ``sftp`` subsystem
(chrooted at the agent's mounts root, docs/protocol.md §6) copies every mount path of the app
into the local directory (same layout, permission bits, mtimes; symlinks as symlinks), then
keeps both in step until stopped:

- local changes: watchfiles (inotify) wakes the loop after ``sync_debounce`` seconds of quiet;
- pod changes: a stat walk of the remote tree every ``sync_interval`` seconds (SFTP has no
  change notifications);
- each wake-up is one three-way pass (tpenv.kits.treesync: what changed since the last sync
  on either side, the conflict rule, echo suppression).

Readiness: ``start()`` returns after the first full copy. ``stop()`` makes one last pass so
local edits made just before reach the pod, then closes the SFTP session; a temporary
directory is removed, a directory the user gave keeps the copy (a marker file in it lets the
next run reuse it: the pod's copy is then the truth).

Symlinks: the agent's SFTP server resolves link targets itself (``realpath``), refusing any
that lead out of its root; a link is copied as a relative link to where it finally leads, if
that stays inside the same mount path. Others are skipped, with one warning each.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import asyncssh

from tpenv.engine.units import State, UnitState
from tpenv.errors import TunnelDropped, UsageError
from tpenv.kits import treesync as ts
from tpenv.kits.treesync import DIR, FILE, LINK, Entry
from tpenv.engine.syncscan import RemoteTree
from tpenv.settings import Settings

log = logging.getLogger("tpenv.syncmount")

OpenSftpClient = Callable[[], Awaitable[Any]]  # an asyncssh.SFTPClient on the agent's mounts
MARKER = ts.TEMP_PREFIX + "copy"  # in the local root: "this directory is a sync copy tpenv made"
FINAL_PASS_TIMEOUT = 30.0
# Errors that mean the SFTP session itself is gone (the pass cannot go on), not one file.
_SESSION_GONE = (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection, asyncssh.DisconnectError,
                 asyncssh.ChannelOpenError, ConnectionError, EOFError)


class _Limits:
    def __init__(self, settings: Settings | None) -> None:
        m = (settings or Settings()).mounts  # none given: the documented defaults, never others
        self.interval, self.debounce = m.sync_interval, m.sync_debounce
        self.max_files, self.max_bytes = m.sync_max_files, m.sync_max_bytes


class SyncMount:
    """A local copy of the agent's volumes kept in step both ways; a unit like SshfsMount.

    ``open_client``: returns an SFTP client on the agent (``AgentSession.sftp``). ``mounts``:
    the app's mount paths (the agent's ``mounts`` op). ``path``: the local directory (None: a
    fresh temporary one, removed on stop)."""

    def __init__(self, open_client: OpenSftpClient, path: str | Path | None, mounts: list[str], *,
                 name: str, settings: Settings | None = None, key: tuple = ()) -> None:
        self.open_client = open_client
        self.name = name
        self.key = key or ("mount", name)
        self.roots = ts.top_roots(mounts)
        self.limits = _Limits(settings)
        self._given = Path(path) if path is not None else None
        self.path: Path | None = None
        self._created_tmp = False
        self._client: Any = None
        self._remote: RemoteTree | None = None  # the pod's side, once the SFTP session is open
        self._state = UnitState()
        self._base_local: dict[str, Entry] = {}
        self._base_remote: dict[str, Entry] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stop_watch = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._stopped = False
        self._warned: set[str] = set()
        self.passes = 0  # completed sync passes
        self._started = 0
        self._pass_done = asyncio.Condition()

    # -- the unit ---------------------------------------------------------------------------------

    def health(self) -> UnitState:
        return self._state

    async def start(self) -> None:
        self._state.set(State.STARTING)
        self._prepare_dir()
        try:
            try:
                self._client = await self.open_client()
                self._remote = RemoteTree(self._client, self.roots, name=self.name, warn_once=self._warn_once)
            except (OSError, asyncssh.Error) as e:
                raise TunnelDropped(f"[mount/{self.name}] the agent refused the sftp session: {e}") from e
            await self._initial_copy()
        except BaseException:
            await self._cleanup()
            raise
        self._tasks = [asyncio.ensure_future(self._watch_local()), asyncio.ensure_future(self._loop())]
        log.info("[mount/%s] volumes copied to %s (sync mode, every %.1fs)", self.name, self.path,
                 self.limits.interval)
        self._state.set(State.READY, detail=str(self.path))

    def _prepare_dir(self) -> None:
        if self._given is None:
            self.path = Path(os.path.realpath(tempfile.mkdtemp(prefix="telfs-")))
            self._created_tmp = True
        else:
            self.path = self._given.expanduser().absolute()
            if self.path.exists() and not self.path.is_dir():
                raise UsageError(f"mount directory {self.path} exists and is not a directory")
            if self.path.is_dir() and any(self.path.iterdir()) and not (self.path / MARKER).exists():
                raise UsageError(f"mount directory {self.path} is not empty (and not a previous sync copy)",
                                 hint="give an empty or new directory with --mount DIR")
            self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MARKER).write_text("a copy of an intercepted pod's volumes, kept by tpenv (sync mode)\n")

    async def _initial_copy(self) -> None:
        remote = await self._scan_remote(limit=True)
        local = await asyncio.to_thread(self._scan_local)
        for root in self.roots:
            if root not in remote:
                self._warn_once(root, "[mount/%s] %s is not in the pod's mounts: not copied", self.name, "/" + root)
        async with self._lock:
            # The plan's bases: both sides as the local copy is now (see treesync.initial_plan).
            self._base_local, self._base_remote = dict(local), dict(local)
            await self._apply(ts.initial_plan(local, remote, self.roots))
        self._started += 1
        self.passes += 1

    async def stop(self) -> None:
        """One last pass (local edits reach the pod), then close. Safe twice."""
        if self._stopped:
            return
        self._stopped = True
        self._state.set(State.STOPPING)
        self._stop_watch.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._client is not None and self._state.last_error is None:
            try:
                async with asyncio.timeout(FINAL_PASS_TIMEOUT):
                    await self.sync_once()
            except Exception as e:  # noqa: BLE001 - the last pass is best effort; say what was lost
                log.warning("[mount/%s] the last sync before stopping failed: %s", self.name, e)
        await self._cleanup()
        self._state.set(State.STOPPED)

    def abort(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.exit()

    async def _cleanup(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.exit()
                await self._client.wait_closed()
            self._client = None
        if self._created_tmp and self.path is not None:
            await asyncio.to_thread(shutil.rmtree, self.path, True)

    async def __aenter__(self) -> "SyncMount":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the loop ---------------------------------------------------------------------------------

    async def _watch_local(self) -> None:
        from watchfiles import awatch

        assert self.path is not None
        step = max(int(self.limits.debounce * 1000), 10)
        async for _changes in awatch(self.path, watch_filter=None, debounce=max(2000, step * 4), step=step,
                                     stop_event=self._stop_watch, recursive=True):
            self._wake.set()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.limits.interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.sync_once()
            except _SESSION_GONE as e:
                self._state.set(State.FAILED, error=f"the sftp session to the agent ended: {e}")
                async with self._pass_done:
                    self._pass_done.notify_all()
                return
            except (asyncssh.SFTPError, OSError) as e:
                # A whole pass failed (a mount path unreadable now): say it, try again next time.
                log.warning("[mount/%s] sync pass failed: %s", self.name, e)
            except Exception as e:  # noqa: BLE001 - a bug must show in the unit's health, not end the loop unseen
                log.exception("[mount/%s] sync stopped", self.name)
                self._state.set(State.FAILED, error=f"sync stopped: {type(e).__name__}: {e}")
                async with self._pass_done:
                    self._pass_done.notify_all()
                return

    async def sync_once(self) -> ts.Plan:
        """One three-way pass: scan both sides, apply the plan. Returns the plan carried out."""
        async with self._lock:
            self._started += 1
            try:
                remote = await self._scan_remote()
                local = await asyncio.to_thread(self._scan_local)
                p = ts.plan(self._base_local, self._base_remote, local, remote, self.roots)
                await self._apply(p)
            finally:
                self.passes += 1
                async with self._pass_done:
                    self._pass_done.notify_all()
            return p

    async def settled(self) -> None:
        """Until a whole pass that began after this call has ended: what either side had before
        the call is then in step (unless it conflicted)."""
        target = self._started + 1
        async with self._pass_done:
            await self._pass_done.wait_for(lambda: self.passes >= target or self._state.state is State.FAILED)

    # -- scanning ---------------------------------------------------------------------------------

    def _scan_local(self) -> dict[str, Entry]:
        assert self.path is not None
        skipped: set[str] = set()
        out = ts.scan_local(self.path, self.roots, skipped)
        for rel in skipped:
            self._warn_once(rel, "[mount/%s] not synced: %s (a special file, or a symlink leading out of its "
                                 "volume)", self.name, rel)
        return out

    async def _scan_remote(self, *, limit: bool = False) -> dict[str, Entry]:
        assert self._remote is not None
        return await self._remote.scan(self.limits if limit else None)

    # -- carrying out a plan ----------------------------------------------------------------------

    async def _apply(self, plan: ts.Plan) -> None:
        for p in plan.conflicts:
            log.warning("[mount/%s] %s changed both here and in the pod since the last sync: the local copy wins",
                        self.name, "/" + p)
        for a in plan.ordered():
            try:
                done = await self._carry_out(a)
            except _SESSION_GONE:
                raise
            except (OSError, asyncssh.SFTPError) as e:
                # One path failed (busy, vanished, refused): the base keeps the old state, so the
                # next pass tries it again.
                log.warning("[mount/%s] %s %s: %s", self.name, a.op.replace("_", " "), "/" + a.path, e)
                continue
            if done is not None:
                ts.apply_to_base(self._base_local, self._base_remote, a.path, *done)

    async def _carry_out(self, a: ts.Action) -> tuple[Entry | None, Entry | None] | None:
        """Do one action; (local, remote) entries as they are now, or None when skipped."""
        assert self.path is not None
        lpath = self.path / a.path
        rpath = "/" + a.path
        if a.op == "record":
            return a.local, a.remote
        if a.op == "delete_local":
            if ts.local_entry(lpath) != a.local:
                return None  # changed since the scan: the next pass decides
            if a.local is not None and a.local.kind == DIR:
                os.rmdir(lpath)
            else:
                os.unlink(lpath)
            log.debug("[mount/%s] deleted here: %s", self.name, rpath)
            return None, None
        if a.op == "delete_remote":
            if a.remote is not None and a.remote.kind == DIR:
                await self._client.rmdir(rpath)
            else:
                await self._client.remove(rpath)
            log.debug("[mount/%s] deleted in the pod: %s", self.name, rpath)
            return None, None
        if a.op == "pull":
            assert a.remote is not None
            if ts.local_entry(lpath) != a.local:
                return None
            await self._pull(a.remote, lpath, rpath)
            log.debug("[mount/%s] pulled %s", self.name, rpath)
            return ts.local_entry(lpath), a.remote
        assert a.op == "push" and a.local is not None
        existing = await self._remote_entry_now(a.path)
        if existing != a.remote:
            return None  # changed in the pod since the scan: the next pass decides
        await self._push(a.local, existing, lpath, rpath)
        log.debug("[mount/%s] pushed %s", self.name, rpath)
        return a.local, await self._remote_entry_now(a.path)

    async def _remote_entry_now(self, rel: str) -> Entry | None:
        try:
            attrs = await self._client.lstat("/" + rel)
        except asyncssh.SFTPNoSuchFile:
            return None
        assert self._remote is not None
        return await self._remote.entry(rel, attrs)

    async def _pull(self, e: Entry, lpath: Path, rpath: str) -> None:
        lpath.parent.mkdir(parents=True, exist_ok=True)
        existing = ts.local_entry(lpath)
        if e.kind == DIR:
            if existing is not None and existing.kind != DIR:
                lpath.unlink()
            lpath.mkdir(exist_ok=True)
            os.chmod(lpath, e.mode)
            return
        tmp = lpath.parent / f"{ts.TEMP_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            if e.kind == FILE:
                await self._client.get(rpath, str(tmp), preserve=True)
            else:
                os.symlink(e.target, tmp)
            if existing is not None and existing.kind == DIR:
                lpath.rmdir()  # a directory replaced by a file: its contents were deleted first
            os.replace(tmp, lpath)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    async def _push(self, e: Entry, existing: Entry | None, lpath: Path, rpath: str) -> None:
        if e.kind == DIR:
            if existing is not None and existing.kind != DIR:
                await self._client.remove(rpath)
                existing = None
            if existing is None:
                await self._client.mkdir(rpath, asyncssh.SFTPAttrs(permissions=e.mode))
            await self._client.chmod(rpath, e.mode)
            return
        if e.kind == LINK:
            if existing is not None:
                await (self._client.rmdir if existing.kind == DIR else self._client.remove)(rpath)
            await self._client.symlink(e.target, rpath)
            return
        tmp = posixpath.join(posixpath.dirname(rpath), f"{ts.TEMP_PREFIX}{uuid.uuid4().hex[:12]}")
        try:
            await self._client.put(str(lpath), tmp, preserve=True)
            if existing is not None and existing.kind == DIR:
                await self._client.rmdir(rpath)
            await self._client.posix_rename(tmp, rpath)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._client.remove(tmp)
            raise

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)


__all__ = ["SyncMount", "MARKER"]
