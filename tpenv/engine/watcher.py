"""Restart-on-save: watch a handler's ``cwd`` for files matching ``watch`` globs (minus ``ignore``).

Built on ``watchfiles.awatch`` (inotify on Linux), which already coalesces a burst of changes:
it yields once ``step`` ms pass without a new change, at most ``debounce`` ms after the first.
Globs are relative to the watched directory; ``**`` spans directories, ``*`` and ``?`` do not.
watchfiles' default filter also drops .git, __pycache__, node_modules and editor swap files.
"""
from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from watchfiles import DefaultFilter, awatch

from tpenv.kits.aio import NamedTask, unit_logger

# watchfiles logs "1 change detected" at INFO for every save; ours says which file and why.
if logging.getLogger("watchfiles").level == logging.NOTSET:
    logging.getLogger("watchfiles").setLevel(logging.WARNING)

READY_TIMEOUT = 30.0  # inotify setup of a big tree on a loaded machine
STEP_MS = 50


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


class GlobFilter:
    """watchfiles filter: relative path matches one ``watch`` glob and no ``ignore`` glob."""

    def __init__(self, root: Path, watch: Iterable[str], ignore: Iterable[str] = ()) -> None:
        self.root = root.resolve()
        self.watch = [glob_to_regex(g) for g in watch]
        self.ignore = [glob_to_regex(g) for g in ignore]
        self._default = DefaultFilter()

    def matches(self, relpath: str) -> bool:
        return any(r.match(relpath) for r in self.watch) and not any(r.match(relpath) for r in self.ignore)

    def __call__(self, change: object, path: str) -> bool:
        if not self._default(change, path):  # type: ignore[arg-type]
            return False
        try:
            rel = Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return False
        return self.matches(rel)


class _StopFlag:
    """The ``stop_event`` given to awatch. Its watch thread polls ``is_set()`` once the inotify
    watches exist; the first poll is our readiness signal (awatch exposes none)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Event) -> None:
        self._flag = threading.Event()
        self._loop, self._ready, self._told = loop, ready, False

    def is_set(self) -> bool:
        if not self._told:
            self._told = True
            self._loop.call_soon_threadsafe(self._ready.set)
        return self._flag.is_set()

    def set(self) -> None:
        self._flag.set()


class FileWatcher:
    """Calls ``on_change(relative paths)`` after each debounced burst of matching changes.

    ``async with FileWatcher(...)`` returns once the watches are in place.
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
    ) -> None:
        self.root = Path(root).resolve()
        self.filter = GlobFilter(self.root, watch, ignore)
        self.on_change, self.debounce = on_change, debounce
        self.name, self.recursive = name, recursive
        self.log = unit_logger("watch", name)
        self.ready = asyncio.Event()
        self._task: NamedTask | None = None
        self._flag: _StopFlag | None = None

    async def start(self) -> None:
        self._flag = _StopFlag(asyncio.get_running_loop(), self.ready)
        self._task = NamedTask("watch", self.name, self._run, logger=self.log, stop_grace=1.0)
        waiters = {asyncio.ensure_future(self.ready.wait()), asyncio.ensure_future(self._task.wait())}
        await asyncio.wait(waiters, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        if self._task.error is not None:
            raise self._task.error
        if not self.ready.is_set():
            self.log.warning("file watching not ready after %.0fs; changes may be missed", READY_TIMEOUT)

    async def _run(self, stopping: asyncio.Event) -> None:
        # awatch's debounce is the upper bound of one burst; `step` the quiet time that ends it.
        debounce_ms = max(STEP_MS, int(self.debounce * 1000))
        async for changes in awatch(self.root, watch_filter=self.filter, debounce=debounce_ms,
                                    step=STEP_MS, stop_event=self._flag, recursive=self.recursive):
            rel = set()
            for _change, path in changes:
                try:
                    rel.add(Path(path).resolve().relative_to(self.root).as_posix())
                except ValueError:
                    rel.add(path)
            self.log.debug("changed: %s", ", ".join(sorted(rel)))
            self.on_change(rel)

    async def stop(self) -> None:
        if self._flag is not None:
            self._flag.set()  # ends awatch within one step, no cancel needed
        if self._task is not None:
            await self._task.stop()

    close = stop

    async def wait_closed(self) -> None:
        if self._task is not None:
            await self._task.wait()

    async def __aenter__(self) -> FileWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
