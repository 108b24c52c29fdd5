"""The handler's file watcher never walks into a mount (issue #19): real inotify, real mounts.

A tmpfs mounted under the tree, tpenv's own outputs (mount dir, env file) and symlinked
directories are not entered; a stuck sshfs mount (sshfs SIGSTOPped) under the tree neither
delays the watcher's start nor stops it from reporting saves elsewhere; a stuck one a watch glob
names is walked in a thread, given up after MOUNT_CALL_TIMEOUT, never holding the event loop.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading

import pytest

from local_sshfs import LocalSshfs
from tpenv.engine.watcher import MOUNT_CALL_TIMEOUT, FileWatcher, literal_dir

WAIT = 20.0  # generous: a loaded 2-core machine
pytestmark = pytest.mark.timeout(120)


class Changes:
    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.event = asyncio.Event()

    def __call__(self, paths: set[str]) -> None:
        self.seen |= paths
        self.event.set()

    async def wait_for(self, path: str) -> None:
        async with asyncio.timeout(WAIT):
            while path not in self.seen:
                self.event.clear()
                await self.event.wait()


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs mounted at tmp_path/data (needs root, as the e2e suite does)."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs: run it as root")
    d = tmp_path / "data"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(d)], check=True)
    (d / "sub").mkdir()
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


async def test_mount_points_and_tpenv_outputs_are_not_walked(tmp_path, tmpfs):
    # Stage 1: a tree with a mount point, a mount dir and env file of tpenv's, a symlinked dir.
    (tmp_path / "app.vol").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    changes = Changes()
    async with FileWatcher(tmp_path, ["**/*.py", "**/*.env"], on_change=changes, debounce=0.05,
                           exclude=["app.vol", "app.env"]) as w:
        # Stage 2: files written where the watcher must not look, then one where it must.
        (tmpfs / "x.py").write_text("x")
        (tmpfs / "sub" / "y.py").write_text("y")
        (tmp_path / "app.vol" / "z.py").write_text("z")
        (tmp_path / "app.env").write_text("SECRET=1")
        (tmp_path / "src" / "new").mkdir()
        (tmp_path / "src" / "main.py").write_text("main")
        await changes.wait_for("src/main.py")  # by then the new directory's creation was seen and walked
        # A directory created after the start is walked too.
        (tmp_path / "src" / "new" / "later.py").write_text("later")
        await changes.wait_for("src/new/later.py")
        skipped = "\n".join(w.skipped)
    # Stage 3: only the developer's files were reported; the mount was skipped, and said why.
    assert changes.seen == {"src/main.py", "src/new/later.py"}
    assert f"{tmpfs}: a mount point" in skipped
    assert f"{tmp_path / 'app.vol'}: tpenv's own output" in skipped


async def test_a_mount_named_by_a_watch_glob_is_watched(tmp_path, tmpfs):
    changes = Changes()
    async with FileWatcher(tmp_path, ["data/**/*.json"], on_change=changes, debounce=0.05):
        (tmpfs / "sub" / "a.json").write_text("{}")
        await changes.wait_for("data/sub/a.json")


def test_literal_dir_of_a_glob():
    assert literal_dir("data/**/*.json") == "data"
    assert literal_dir("./a/b/c.py") == "a/b"
    assert literal_dir("*.py") == ""
    assert literal_dir("src/*/x/*.py") == "src"


async def test_a_stuck_sshfs_mount_in_the_tree_does_not_hold_the_watcher(tmp_path):
    # Stage 1: a real sshfs mount under the watched tree, then made unresponsive (SIGSTOP).
    remote = tmp_path.parent / (tmp_path.name + "-remote")
    (remote / "deep").mkdir(parents=True)
    (remote / "deep" / "f.py").write_text("remote")
    (tmp_path / "src").mkdir()
    fs = await LocalSshfs(remote, tmp_path / "cart.vol").start()
    try:
        os.kill(fs.sshfs.pid, signal.SIGSTOP)
        # Stage 2: the watcher starts (it would hang walking into the mount) and reports a save.
        changes = Changes()
        async with asyncio.timeout(WAIT):
            watcher = FileWatcher(tmp_path, ["**/*.py"], on_change=changes, debounce=0.05)
            await watcher.start()
        try:
            (tmp_path / "src" / "server.py").write_text("v2")
            await changes.wait_for("src/server.py")
        finally:
            # Stage 3: it stops at once too (no thread stuck in the kernel to join).
            async with asyncio.timeout(WAIT):
                await watcher.stop()
        assert any(s.startswith(str(tmp_path / "cart.vol")) for s in watcher.skipped)
    finally:
        os.kill(fs.sshfs.pid, signal.SIGCONT)
        fs.close()


async def test_a_stuck_mount_named_by_a_watch_glob_does_not_hold_the_loop(tmp_path):
    # Stage 1: a real sshfs mount under the tree, named by a watch glob, then made unresponsive.
    remote = tmp_path.parent / (tmp_path.name + "-remote")
    (remote / "deep").mkdir(parents=True)
    (tmp_path / "src").mkdir()
    fs = await LocalSshfs(remote, tmp_path / "cart.vol").start()
    os.kill(fs.sshfs.pid, signal.SIGSTOP)
    # A walk on the loop would block it in the kernel, where no asyncio timeout can end it: this
    # timer thread then resumes sshfs, so such a walk ends and fails the test instead of hanging it.
    rescued = threading.Event()
    timer = threading.Timer(MOUNT_CALL_TIMEOUT + WAIT, lambda: (rescued.set(), os.kill(fs.sshfs.pid, signal.SIGCONT)))
    timer.start()
    try:
        # Stage 2: the watcher starts while the loop keeps running (a ticker counts its turns).
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.1)
                ticks += 1

        ticking = asyncio.ensure_future(ticker())
        changes = Changes()
        watcher = FileWatcher(tmp_path, ["cart.vol/**/*.py", "src/*.py"], on_change=changes, debounce=0.05)
        await watcher.start()
        ticking.cancel()
        assert not rescued.is_set(), "the walk of the stuck mount held the event loop"
        assert ticks > 0, "the loop did not run while the stuck mount was walked"
        # Stage 3: the mount is left unwatched, and said why; saves elsewhere are still reported.
        assert any(s.startswith(f"{tmp_path / 'cart.vol'}: in a mount that did not answer") for s in watcher.skipped), \
            watcher.skipped
        try:
            (tmp_path / "src" / "server.py").write_text("v2")
            await changes.wait_for("src/server.py")
        finally:
            async with asyncio.timeout(WAIT):
                await watcher.stop()
    finally:
        timer.cancel()
        os.kill(fs.sshfs.pid, signal.SIGCONT)
        fs.close()
