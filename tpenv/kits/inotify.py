"""Linux inotify on the event loop: no thread, nothing that can block.

Why not ``watchfiles``: its Rust watcher is built on the calling thread and walks the whole
tree, ``stat``-ing everything below the root, including FUSE mounts. A walk into our own sshfs
mount waits for sshfs, which waits for the event loop to pump its SFTP channel: a deadlock
that also swallows Ctrl-C (issue #19). Here the caller decides which directories get a watch
(``add_watch`` of one directory, never recursive), and events are read from the inotify file
descriptor by the loop's reader callback (``os.read`` of a non-blocking fd).
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from tpenv.errors import MissingTool, TransientError

IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x1, 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED = 0x4000, 0x8000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK, IN_ISDIR = 0x01000000, 0x02000000, 0x04000000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC

# What a save looks like, whatever the editor: written in place, replaced by a rename, touched.
CHANGES = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
           | IN_DELETE_SELF | IN_MOVE_SELF)
# A symlink is never followed (it may point into a mount); only directories are watched.
DIR_FLAGS = IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK

_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    name: str  # the entry's name inside the watched directory; "" for the directory itself

    @property
    def is_dir(self) -> bool:
        return bool(self.mask & IN_ISDIR)


def parse_events(data: bytes) -> list[Event]:
    """``struct inotify_event`` records of one ``read()`` (pure: unit-tested)."""
    out, i = [], 0
    while i + _HEADER.size <= len(data):
        wd, mask, _cookie, length = _HEADER.unpack_from(data, i)
        i += _HEADER.size
        name = data[i:i + length].split(b"\0", 1)[0].decode(errors="surrogateescape")
        i += length
        out.append(Event(wd, mask, name))
    return out


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.inotify_init1  # noqa: B018 - present on Linux only
        except (OSError, AttributeError) as e:
            raise MissingTool("file watching needs Linux inotify, which this system lacks",
                              hint="run without run.watch, or restart the handler yourself") from e
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = lib
    return _libc


class Inotify:
    """One inotify instance whose events reach ``on_events(list[Event])`` in the loop.

    ``async with Inotify(on_events) as ino: ino.add_watch(path)``; ``close()`` safe twice.
    """

    def __init__(self, on_events: Callable[[list[Event]], None]) -> None:
        self.on_events = on_events
        self.fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        fd = _lib().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            hint = ("raise fs.inotify.max_user_instances (sysctl)" if err == errno.EMFILE else None)
            raise TransientError(f"inotify_init1: {os.strerror(err)}", hint=hint)
        self.fd = fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    def add_watch(self, path: str, mask: int = CHANGES | DIR_FLAGS) -> int:
        """Watch one directory (not its subdirectories); OSError (ENOENT, EACCES, ENOSPC...) on failure."""
        wd = _lib().inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return wd

    def rm_watch(self, wd: int) -> None:
        _lib().inotify_rm_watch(self.fd, wd)  # EINVAL when the kernel dropped it already: fine

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            return  # closed meanwhile
        if data:
            self.on_events(parse_events(data))

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(fd)
            os.close(fd)

    async def wait_closed(self) -> None:
        return None  # nothing runs in the background

    async def __aenter__(self) -> "Inotify":
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
