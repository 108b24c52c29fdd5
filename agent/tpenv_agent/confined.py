"""Files beneath one directory, race-free: the agent's SFTP root (protocol §4, issue 12).

A path-string check is not enough: the OS follows symlinks after the check, so an absolute
symlink already in an app volume, or a chain of links a client made itself (each harmless when
made), leads to the agent's host key, its code or the pod's service-account token. Here every
path is resolved by the kernel relative to a directory fd with ``openat2(2)`` and
``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS``: a resolution that would leave the root at any step
(``..``, an absolute link, a relative link climbing out, a ``/proc/<pid>/root`` magic link)
fails with EXDEV/ELOOP, atomically with the open. Operations on a name (unlink, mkdir, rename,
readlink, symlink) run with ``*at`` calls on the confined parent directory's fd, never
following the last component.

Where ``openat2`` is missing (kernels before 5.6, or a seccomp profile without it), the walk
is done one component at a time with ``O_NOFOLLOW``, refusing ``..`` and every symlink: safe,
only stricter.
"""
from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import stat
from typing import Callable

# linux/openat2.h; the syscall number is the same on every architecture using the generic
# table (x86_64, arm64, riscv64, ...).
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class Escape(PermissionError):
    """A path that resolves outside the root (or through a /proc magic link): refused."""


def _openat2(dirfd: int, rel: bytes, flags: int, mode: int) -> int:
    tmpfile = getattr(os, "O_TMPFILE", 0)  # includes O_DIRECTORY's bit: compared whole
    creates = flags & os.O_CREAT or (tmpfile and flags & tmpfile == tmpfile)
    how = _OpenHow(flags | os.O_CLOEXEC, mode if creates else 0, RESOLVE)  # a mode without them is EINVAL
    while True:
        fd = _libc.syscall(SYS_OPENAT2, ctypes.c_int(dirfd), ctypes.c_char_p(rel),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err == errno.EINTR or err == errno.EAGAIN:
            continue  # EAGAIN: a concurrent rename raced the lookup; the kernel asks to retry
        raise OSError(err, os.strerror(err), rel)


def _probe_openat2() -> bool:
    try:
        os.close(_openat2(-100, b".", os.O_PATH | os.O_DIRECTORY, 0))  # AT_FDCWD
        return True
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EPERM):  # no such syscall, or seccomp says no
            return False
        return True


HAVE_OPENAT2 = _probe_openat2()


def relative(path: bytes | str) -> bytes:
    """A client's path (absolute or not, relative to the root either way) as the relative path
    the kernel resolves beneath the root: leading slashes dropped, ``""`` → ``"."``. Nothing else
    is normalised: ``..`` is left for the kernel to refuse when it climbs out."""
    p = path.encode() if isinstance(path, str) else bytes(path)
    p = p.lstrip(b"/")
    return p or b"."


class Root:
    """A directory every path is resolved beneath. ``close()`` is safe twice."""

    def __init__(self, path: str | bytes) -> None:
        self.path = os.fsdecode(path)
        self.fd: int | None = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def _root_fd(self) -> int:
        if self.fd is None:
            raise OSError(errno.EBADF, "the confined root is closed")
        return self.fd

    def open(self, path: bytes | str, flags: int, mode: int = 0o666) -> int:
        """An fd for ``path`` beneath the root, following symlinks only while they stay beneath
        it (unless ``flags`` has ``O_NOFOLLOW``: then a final symlink is opened itself with
        ``O_PATH``, refused otherwise)."""
        rel = relative(path)
        try:
            if HAVE_OPENAT2:
                return _openat2(self._root_fd(), rel, flags, mode)
            return self._walk(rel, flags, mode)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ELOOP):
                raise Escape(errno.EACCES, f"{os.fsdecode(rel)}: leads outside the mounted volumes "
                                           "(or through a symlink loop): refused") from e
            raise

    def _walk(self, rel: bytes, flags: int, mode: int) -> int:
        """The fallback without openat2: component by component, no ``..``, no symlinks."""
        parts = [c for c in rel.split(b"/") if c not in (b"", b".")]
        if any(c == b".." for c in parts):
            raise OSError(errno.EXDEV, "'..' is not followed without openat2", rel)
        fd = os.dup(self._root_fd())
        try:
            for i, comp in enumerate(parts):
                last = i == len(parts) - 1
                f = (flags | os.O_NOFOLLOW) if last else (os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    nfd = os.open(comp, f | os.O_CLOEXEC, mode, dir_fd=fd)
                except OSError as e:
                    if e.errno == errno.ENOTDIR and not last and stat.S_ISLNK(
                            os.stat(comp, dir_fd=fd, follow_symlinks=False).st_mode):
                        raise OSError(errno.ELOOP, "symlinks are not followed without openat2", rel) from e
                    raise
                os.close(fd)
                fd = nfd
            if not parts and not flags & os.O_PATH:
                nfd = os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=fd)
                os.close(fd)
                fd = nfd
            if not flags & os.O_NOFOLLOW and stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.ELOOP, "symlinks are not followed without openat2", rel)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def parent(self, path: bytes | str) -> tuple[int, bytes]:
        """(fd of the confined parent directory, last component) for operations on a name.
        The last component is never ``.`` or ``..`` (refused: it would name the parent itself
        or climb)."""
        rel = relative(path).rstrip(b"/") or b"."
        head, name = posixpath.split(rel)
        if name in (b".", b".."):
            raise Escape(errno.EACCES, f"{os.fsdecode(rel)}: not a name this operation can act on")
        return self.open(head or b".", os.O_PATH | os.O_DIRECTORY), name

    def with_parent(self, path: bytes | str, fn: Callable[[int, bytes], object]) -> object:
        dfd, name = self.parent(path)
        try:
            return fn(dfd, name)
        finally:
            os.close(dfd)

    def with_fd(self, path: bytes | str, flags: int, fn: Callable[[int], object]) -> object:
        fd = self.open(path, flags)
        try:
            return fn(fd)
        finally:
            os.close(fd)

    def where(self, fd: int) -> bytes:
        """The path of an open fd, relative to the root, as ``/a/b`` (``/`` for the root)."""
        here = os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))
        top = os.fsencode(os.readlink(f"/proc/self/fd/{self._root_fd()}"))
        if here == top:
            return b"/"
        if here.startswith(top.rstrip(b"/") + b"/"):
            return here[len(top.rstrip(b"/")):]
        raise Escape(errno.EACCES, "outside the mounted volumes")
