"""Restart-on-save: watch a handler's ``cwd`` for files matching ``watch`` globs (minus ``ignore``).

Globs are relative to the watched directory; ``**`` spans directories, ``*`` and ``?`` do not.
Like watchfiles' default filter, .git, __pycache__, node_modules, .venv (and the like) and
editor swap files are never reported.

What is never walked into (issue #19: a walk into our own sshfs mount deadlocked ``tpenv up``):

- a **mount point** under the tree (sshfs, NFS, a bind mount...), found in
  ``/proc/self/mountinfo`` without touching it, unless a ``watch`` glob names a path inside it
  by its literal leading directories (``data/**/*.json`` names the mount at ``data``);
- the ``exclude`` paths, always: tpenv's own outputs (the intercept's mount directory, which
  in sync mode is a plain copy the pod writes to, and its env file);
- directories an ``ignore`` glob covers (``vendor/``, ``build/**``), and symlinked directories.

The walk is cooperative (it yields to the event loop every few directories). Outside mounts it
runs on the loop; inside a mount a ``watch`` glob names (which may be a FUSE mount that stops
answering), each directory is watched and listed in a daemon thread, at most
``MOUNT_CALL_TIMEOUT`` seconds: past it the mount is left unwatched (logged, and listed in
``skipped``) and the thread, stuck in the kernel, is abandoned (nothing joins it), so nothing can
hold up the loop or a shutdown. Directories created later are walked
with the same rules when their creation is seen. A burst of changes is coalesced: ``on_change``
runs once ``STEP`` seconds pass without a new change, at most ``debounce`` after the first.
"""
from __future__ import annotations

import asyncio
import errno
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from tpenv.kits.aio import DaemonExecutor, unit_logger
from tpenv.kits.inotify import IN_CREATE, IN_IGNORED, IN_MOVED_TO, IN_Q_OVERFLOW, Event, Inotify
from tpenv.kits.mounttable import mount_points

STEP = 0.05  # quiet time that ends a burst
YIELD_EVERY = 64  # directories walked between two yields to the loop
IGNORED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", ".idea", "node_modules",
                          ".mypy_cache", ".pytest_cache", ".hypothesis"})
MOUNT_CALL_TIMEOUT = 5.0  # seconds a directory inside a named mount may take to watch and list
_THREADS = DaemonExecutor()  # daemon threads: one stuck in a FUSE call never holds the exit
IGNORED_FILES = re.compile(r"\.py[cod]$|\.___jb_...___$|\.sw.$|~$|^\.#|^\.DS_Store$|^flycheck_")


def glob_to_regex(glob: str) -> re.Pattern[str]:
    """``src/**/*.py`` -> a regex over posix paths relative to the root."""
    glob = glob.strip()
    if glob.startswith("./"):
        glob = glob[2:]
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = glob.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = glob[i + 1:end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    # A glob naming a directory ("vendor/") covers everything below it.
    pattern = "".join(out)
    if glob.endswith("/"):
        pattern += ".*"
    return re.compile(pattern + r"\Z")


def literal_dir(glob: str) -> str:
    """The leading directories of a glob before its first wildcard: ``data/x/**/*.json`` -> ``data/x``."""
    glob = glob.strip().removeprefix("./")
    parts = glob.split("/")[:-1]  # the last part names files
    out = []
    for p in parts:
        if any(ch in p for ch in "*?["):
            break
        out.append(p)
    return "/".join(out)


def _resolve_parent(path: Path) -> str:
    # Symlinks resolved in the parent only: resolving the last component would stat it, and a
    # stat of a stuck FUSE mount point hangs.
    path = Path(os.path.abspath(path))
    return os.path.join(os.path.realpath(path.parent), path.name)


class GlobFilter:
    """Relative path matches one ``watch`` glob and no ``ignore`` glob (nor the default noise)."""

    def __init__(self, root: Path, watch: Iterable[str], ignore: Iterable[str] = ()) -> None:
        self.root = root.resolve()
        self.watch_globs = list(watch)
        self.watch = [glob_to_regex(g) for g in self.watch_globs]
        self.ignore = [glob_to_regex(g) for g in ignore]

    def matches(self, relpath: str) -> bool:
        parts = relpath.split("/")
        if IGNORED_FILES.search(parts[-1]) or any(p in IGNORED_DIRS for p in parts[:-1]):
            return False
        return any(r.match(relpath) for r in self.watch) and not any(r.match(relpath) for r in self.ignore)

    def skips_dir(self, relpath: str) -> bool:
        """A directory nothing below which can be reported: default noise, or covered by ``ignore``."""
        return relpath.rsplit("/", 1)[-1] in IGNORED_DIRS or any(r.match(relpath + "/") for r in self.ignore)

    def names(self, relpath: str) -> bool:
        """Does a ``watch`` glob name this directory (or a path below it) by its literal prefix?"""
        return any(d == relpath or d.startswith(relpath + "/") for d in map(literal_dir, self.watch_globs))


class FileWatcher:
    """Calls ``on_change(relative paths)`` after each debounced burst of matching changes.

    ``async with FileWatcher(...)`` returns once the watches are in place. ``recursive=False``
    watches the root directory alone (the config file's directory).
    """

    def __init__(
        self,
        root: str | Path,
        watch: Iterable[str],
        ignore: Iterable[str] = (),
        *,
        on_change: Callable[[set[str]], None],
        debounce: float = 0.2,
        name: str = "files",
        recursive: bool = True,
        exclude: Iterable[str | Path] = (),
    ) -> None:
        self.root = Path(root).resolve()
        self.filter = GlobFilter(self.root, watch, ignore)
        self.on_change, self.debounce = on_change, debounce
        self.name, self.recursive = name, recursive
        self.exclude = {_resolve_parent(self.root / p) for p in exclude}
        self.log = unit_logger("watch", name)
        self.ready = asyncio.Event()
        self.skipped: list[str] = []  # directories not walked into, and why (status, tests)
        self._ino = Inotify(self._on_events)
        self._dirs: dict[int, str] = {}  # watch descriptor -> absolute directory
        self._pending: set[str] = set()
        self._first: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._walks: set[asyncio.Task] = set()
        self._full_warned = False
        self._closed = False

    async def start(self) -> None:
        self._ino.open()
        try:
            await self._walk(str(self.root))
        except BaseException:
            self._ino.close()
            raise
        self.ready.set()
        self.log.debug("watching %d directories under %s", len(self._dirs), self.root)

    # -- walking ------------------------------------------------------------------------------

    def _why_not(self, path: str, mounts: set[str]) -> str | None:
        """Why the directory ``path`` is not walked into, or None."""
        if path in self.exclude or any(path.startswith(e + "/") for e in self.exclude):
            return "tpenv's own output (mount or env file)"
        rel = os.path.relpath(path, self.root)
        if rel == ".":
            return None
        if path in mounts and not self.filter.names(rel):
            return "a mount point (name it in a watch glob to watch it)"
        if self.filter.skips_dir(rel):
            return "ignored"
        return None

    def _mount_of(self, path: str, mounts: set[str]) -> str | None:
        """The mount point strictly under the root that holds ``path`` (the innermost), if any."""
        inside = [m for m in mounts if m.startswith(str(self.root) + "/") and (path == m or path.startswith(m + "/"))]
        return max(inside, key=len) if inside else None

    async def _walk(self, top: str) -> None:
        """Watch ``top`` and (when recursive) every directory below it that may be walked."""
        mounts = mount_points()
        stuck: set[str] = set()  # named mounts that did not answer: not walked further
        stack, walked = [top], 0
        while stack and not self._closed:
            path = stack.pop()
            why = self._why_not(path, mounts)
            mount = self._mount_of(path, mounts) if why is None else None
            if mount in stuck:
                why = "in a mount that did not answer"
            if why is not None:
                self.skipped.append(f"{path}: {why}")
                self.log.debug("not watching %s: %s", path, why)
                continue
            if mount is None:
                wd, children = self._visit(path)
            else:
                try:
                    wd, children = await asyncio.wait_for(
                        asyncio.get_running_loop().run_in_executor(_THREADS, self._visit, path), MOUNT_CALL_TIMEOUT)
                except TimeoutError:
                    stuck.add(mount)
                    self.skipped.append(f"{path}: in a mount that did not answer within {MOUNT_CALL_TIMEOUT:.0f}s")
                    self.log.warning("not watching %s: the mount %s did not answer within %.0fs", path, mount,
                                     MOUNT_CALL_TIMEOUT)
                    continue
            if wd is not None:
                self._dirs[wd] = path
            stack.extend(children)
            walked += 1
            if walked % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    def _visit(self, path: str) -> tuple[int | None, list[str]]:
        """Watch ``path`` and list its subdirectories (none when not recursive, or not watched).
        Blocking, and safe in a thread: it changes nothing of the watcher's but the inotify fd."""
        wd = self._add(path)
        if wd is None or not self.recursive:
            return wd, []
        try:
            # scandir's d_type answers is_dir() without a stat; a symlink is not followed.
            with os.scandir(path) as it:
                return wd, [e.path for e in it if e.is_dir(follow_symlinks=False)]
        except OSError as e:
            self.log.debug("cannot list %s: %s", path, e)
            return wd, []

    def _add(self, path: str) -> int | None:
        try:
            return self._ino.add_watch(path)
        except OSError as e:
            if e.errno == errno.ENOSPC and not self._full_warned:
                self._full_warned = True
                self.log.warning("cannot watch more directories (%s): raise fs.inotify.max_user_watches, "
                                 "or narrow the tree with ignore globs", path)
            else:
                self.log.debug("cannot watch %s: %s", path, e)
            return None

    # -- events -------------------------------------------------------------------------------

    def _on_events(self, events: list[Event]) -> None:
        for ev in events:
            if ev.mask & IN_Q_OVERFLOW:
                self.log.warning("too many changes at once, some were lost; restarting to be safe")
                self._note("(events lost)")
                continue
            base = self._dirs.get(ev.wd)
            if base is None:
                continue
            if ev.mask & IN_IGNORED:  # the directory is gone
                del self._dirs[ev.wd]
                continue
            if not ev.name:
                continue
            path = os.path.join(base, ev.name)
            if ev.is_dir and ev.mask & (IN_CREATE | IN_MOVED_TO) and self.recursive:
                task = asyncio.ensure_future(self._walk(path))
                self._walks.add(task)
                task.add_done_callback(self._walks.discard)
            rel = os.path.relpath(path, self.root)
            if path in self.exclude or any(path.startswith(e + "/") for e in self.exclude):
                continue
            if self.filter.matches(rel):
                self._note(rel)

    def _note(self, rel: str) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._pending.add(rel)
        if self._first is None:
            self._first = now
        if self._timer is not None:
            self._timer.cancel()
        delay = min(STEP, max(0.0, self._first + max(self.debounce, STEP) - now))
        self._timer = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        paths, self._pending, self._first, self._timer = self._pending, set(), None, None
        if paths and not self._closed:
            self.log.debug("changed: %s", ", ".join(sorted(paths)))
            self.on_change(paths)

    # -- as a resource -----------------------------------------------------------------------

    async def stop(self) -> None:
        """Safe twice; nothing is left running (no thread, no pending callback)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for t in list(self._walks):
            t.cancel()
        if self._walks:
            await asyncio.wait(self._walks)
        self._ino.close()

    close = stop

    async def wait_closed(self) -> None:
        return None

    async def __aenter__(self) -> FileWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
