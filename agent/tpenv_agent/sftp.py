"""The agent's SFTP server (protocol §4): the app's volumes under ``--mounts``, confined.

asyncssh's own ``chroot`` joins strings and lets the OS follow symlinks afterwards; this
server resolves every path through :class:`confined.Root` instead (kernel-checked, race-free),
so no link, ``..`` or ``/proc`` magic link reaches outside the mounts. Every method that takes
a path is overridden; ``map_path`` (what asyncssh's defaults use) refuses, so a method added
by a later asyncssh fails closed instead of opening the raw path.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Any, AsyncIterator

import asyncssh
from asyncssh.sftp import (FXF_APPEND, FXF_CREAT, FXF_EXCL, FXF_READ, FXF_TRUNC, FXF_WRITE,
                           SFTPAttrs, SFTPName)

from .confined import Escape, Root


def _open_flags(pflags: int) -> tuple[int, str]:
    """SFTP v3 open flags → (os flags, file mode), as asyncssh's own ``open`` maps them."""
    if pflags & FXF_READ and pflags & FXF_WRITE:
        flags, mode = os.O_RDWR, "r+b"
    elif pflags & FXF_WRITE:
        flags, mode = os.O_WRONLY, "wb"
    else:
        flags, mode = os.O_RDONLY, "rb"
    if pflags & FXF_APPEND:
        flags |= os.O_APPEND
        mode = "ab+" if flags & os.O_RDWR else "ab"
    if pflags & FXF_CREAT:
        flags |= os.O_CREAT
    if pflags & FXF_TRUNC:
        flags |= os.O_TRUNC
    if pflags & FXF_EXCL:
        flags |= os.O_EXCL
    return flags, mode


def _set_attrs(fd: int, attrs: SFTPAttrs) -> None:
    """Apply ``attrs`` to the object behind an ``O_PATH`` fd, through its /proc/self/fd link
    (the kernel follows our own fd's link to exactly that object: no path lookup, no race)."""
    where = f"/proc/self/fd/{fd}"
    if attrs.uid is not None and attrs.gid is not None:
        os.chown(where, attrs.uid, attrs.gid)
    if attrs.permissions is not None:
        os.chmod(where, stat.S_IMODE(attrs.permissions))
    if attrs.atime is not None and attrs.mtime is not None:
        os.utime(where, times=(attrs.atime, attrs.mtime))
    if attrs.size is not None:
        os.truncate(where, attrs.size)


class ConfinedSFTPServer(asyncssh.SFTPServer):
    """SFTP over one directory tree; the client sees it as ``/``."""

    def __init__(self, chan: Any, root: str) -> None:
        super().__init__(chan)
        self._root = Root(root)

    def exit(self) -> None:
        self._root.close()

    def map_path(self, path: bytes) -> bytes:
        raise Escape(errno.EACCES, "operation not served")

    def reverse_map_path(self, path: bytes) -> bytes:
        raise Escape(errno.EACCES, "operation not served")

    # -- files ---------------------------------------------------------------------------------

    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> Any:
        flags, mode = _open_flags(pflags)
        perms = 0o666 if attrs.permissions is None else stat.S_IMODE(attrs.permissions)
        return os.fdopen(self._root.open(path, flags, perms), mode, buffering=0)

    def open56(self, path: bytes, desired_access: int, flags: int, attrs: SFTPAttrs) -> Any:
        raise asyncssh.SFTPOpUnsupported("SFTP v5/v6 opens are not served (sshfs and tpenv speak v3)")

    # -- attributes ------------------------------------------------------------------------------

    def lstat(self, path: bytes) -> os.stat_result:
        return self._root.with_fd(path, os.O_PATH | os.O_NOFOLLOW, os.fstat)  # type: ignore[return-value]

    def stat(self, path: bytes) -> os.stat_result:
        try:
            return self._root.with_fd(path, os.O_PATH, os.fstat)  # type: ignore[return-value]
        except Escape:
            # A link leading out is shown as the link itself (as a dangling one would be): a
            # client that lists a directory with stat (sshfs -o follow_symlinks) still lists it,
            # and nothing of what lies outside, not even its type, is told.
            return self.lstat(path)

    def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        self._root.with_fd(path, os.O_PATH, lambda fd: _set_attrs(fd, attrs))

    def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        def apply(fd: int) -> None:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise asyncssh.SFTPOpUnsupported("setting a symlink's own attributes is not served")
            _set_attrs(fd, attrs)
        self._root.with_fd(path, os.O_PATH | os.O_NOFOLLOW, apply)

    def statvfs(self, path: bytes) -> os.statvfs_result:
        return self._root.with_fd(path, os.O_PATH, lambda fd: os.statvfs(f"/proc/self/fd/{fd}"))  # type: ignore

    def realpath(self, path: bytes) -> bytes:
        try:
            return self._root.with_fd(path, os.O_PATH, self._root.where)  # type: ignore[return-value]
        except FileNotFoundError:
            # Not there (yet): its confined parent's real path and the name, as OpenSSH answers.
            dfd, name = self._root.parent(path)
            try:
                parent = self._root.where(dfd)
            finally:
                os.close(dfd)
            return parent.rstrip(b"/") + b"/" + name

    # -- directories -----------------------------------------------------------------------------

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        fd = self._root.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield SFTPName(b".", attrs=SFTPAttrs.from_local(os.fstat(fd)))
            yield SFTPName(b"..", attrs=SFTPAttrs.from_local(os.fstat(fd)))  # never the real parent
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while listed
                    yield SFTPName(os.fsencode(entry.name), attrs=SFTPAttrs.from_local(st))
        finally:
            os.close(fd)

    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        mode = 0o777 if attrs.permissions is None else stat.S_IMODE(attrs.permissions)
        self._root.with_parent(path, lambda d, n: os.mkdir(n, mode, dir_fd=d))

    def rmdir(self, path: bytes) -> None:
        self._root.with_parent(path, lambda d, n: os.rmdir(n, dir_fd=d))

    # -- names -----------------------------------------------------------------------------------

    def remove(self, path: bytes) -> None:
        self._root.with_parent(path, lambda d, n: os.unlink(n, dir_fd=d))

    def readlink(self, path: bytes) -> bytes:
        # The target as stored: a client that follows an absolute or climbing one is refused
        # by the next operation, which resolves beneath the root.
        return self._root.with_parent(path, lambda d, n: os.fsencode(os.readlink(n, dir_fd=d)))  # type: ignore

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        # Any target may be written (a link is only text); following it is what is confined.
        self._root.with_parent(newpath, lambda d, n: os.symlink(oldpath, n, dir_fd=d))

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        self._two(oldpath, newpath, lambda sd, sn, dd, dn: os.link(sn, dn, src_dir_fd=sd, dst_dir_fd=dd,
                                                                    follow_symlinks=False))

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        def move(sd: int, sn: bytes, dd: int, dn: bytes) -> None:
            try:
                os.stat(dn, dir_fd=dd, follow_symlinks=False)
            except FileNotFoundError:
                os.rename(sn, dn, src_dir_fd=sd, dst_dir_fd=dd)
                return
            raise asyncssh.SFTPFileAlreadyExists("File already exists")
        self._two(oldpath, newpath, move)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._two(oldpath, newpath, lambda sd, sn, dd, dn: os.replace(sn, dn, src_dir_fd=sd, dst_dir_fd=dd))

    def _two(self, a: bytes, b: bytes, fn: Any) -> None:
        sd, sn = self._root.parent(a)
        try:
            dd, dn = self._root.parent(b)
            try:
                fn(sd, sn, dd, dn)
            finally:
                os.close(dd)
        finally:
            os.close(sd)
