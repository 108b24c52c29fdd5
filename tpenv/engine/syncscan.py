"""Sync mode's view of the pod's volumes: a stat walk over SFTP (:class:`RemoteTree`), each
directory level listed at once, symlinks kept only when they stay inside their volume, and the
size limits (TPENV_MOUNTS_SYNC_MAX_FILES / _BYTES) checked while the walk grows.

Apart from syncmount.py (the unit: start, the loop, carrying out plans) because reading the
remote tree is a concern of its own, with its own failure modes (files vanishing mid-walk).
"""
from __future__ import annotations

import asyncio
import posixpath
import stat
from typing import Any, Callable

import asyncssh

from tpenv.errors import UsageError
from tpenv.kits import treesync as ts
from tpenv.kits.treesync import DIR, Entry


class RemoteTree:
    """The volumes under ``roots`` on the agent, read with the SFTP client ``client``."""

    def __init__(self, client: Any, roots: list[str], *, name: str, warn_once: Callable[..., None]) -> None:
        self.client, self.roots, self.name, self.warn_once = client, roots, name, warn_once

    async def scan(self, limits: Any = None) -> dict[str, Entry]:
        """A stat walk of every root, directory by directory (each level's directories at once);
        with ``limits`` (the sync limits), refused as soon as the volumes outgrow them."""
        out: dict[str, Entry] = {}
        total = 0
        level: list[str] = []
        for root in self.roots:
            try:
                attrs = await self.client.lstat("/" + root)
            except asyncssh.SFTPNoSuchFile:
                continue
            if stat.S_ISDIR(attrs.permissions or 0):
                out[root] = Entry.dir(attrs.permissions)
                level.append(root)
        while level:
            listings = await asyncio.gather(*(self._list_dir(d) for d in level))
            level = []
            for rel_dir, names in listings:
                for name, attrs in names:
                    rel = f"{rel_dir}/{name}"
                    entry = await self.entry(rel, attrs)
                    if entry is None:
                        continue
                    out[rel] = entry
                    total += entry.size
                    if entry.kind == DIR:
                        level.append(rel)
            if limits is not None:
                self._check_limits(limits, len(out), total)
        return out

    async def _list_dir(self, rel_dir: str) -> tuple[str, list[tuple[str, Any]]]:
        names: list[tuple[str, Any]] = []
        try:
            async for n in self.client.scandir("/" + rel_dir):
                name = n.filename if isinstance(n.filename, str) else n.filename.decode()
                if name in (".", "..") or name.startswith(ts.TEMP_PREFIX):
                    continue
                names.append((name, n.attrs))
        except asyncssh.SFTPNoSuchFile:
            pass  # removed while we walked
        return rel_dir, names

    async def entry(self, rel: str, attrs: Any) -> Entry | None:
        """The Entry for ``rel`` from its SFTP attributes; None for what sync mode does not copy."""
        mode = attrs.permissions or 0
        if stat.S_ISDIR(mode):
            return Entry.dir(mode)
        if stat.S_ISREG(mode):
            return Entry.file(mode, attrs.size or 0, attrs.mtime or 0)
        if stat.S_ISLNK(mode):
            return await self._remote_link(rel)
        return None

    async def _remote_link(self, rel: str) -> Entry | None:
        root = next(r for r in self.roots if rel == r or rel.startswith(r + "/"))
        try:
            resolved = (await self.client.realpath("/" + rel)).lstrip("/")
        except asyncssh.SFTPError:
            resolved = None  # the server refuses links leading out of its root
        if resolved is None or not (resolved == root or resolved.startswith(root + "/")):
            self.warn_once(rel, "[mount/%s] not synced: symlink %s leads out of its volume", self.name, "/" + rel)
            return None
        return Entry.link(posixpath.relpath(resolved, posixpath.dirname(rel)))

    def _check_limits(self, limits: Any, files: int, size: int) -> None:
        if files > limits.max_files:
            raise UsageError(f"[mount/{self.name}] the volumes hold more than {limits.max_files} files and "
                             "directories: too many to copy in sync mode",
                             hint="raise TPENV_MOUNTS_SYNC_MAX_FILES, or use sshfs (--mount-mode sshfs), "
                                  "or --mount false")
        if size > limits.max_bytes:
            raise UsageError(f"[mount/{self.name}] the volumes hold more than {limits.max_bytes} bytes: "
                             "too much to copy in sync mode",
                             hint="raise TPENV_MOUNTS_SYNC_MAX_BYTES, or use sshfs (--mount-mode sshfs), "
                                  "or --mount false")


__all__ = ["RemoteTree"]
