"""An sshfs mount that stops answering fails its unit and is abandoned; stop and abort never
wait on it. Real sshfs (passive) on a real FUSE mount, piped to OpenSSH's sftp-server: the
same code path as a tpenv mount, without a cluster (e2e: tests/e2e/test_up_first_run.py)."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from local_sshfs import SFTP_SERVER, mounted, need_sshfs
from tests.kit.procs import alive
from tpenv.engine.mounts import SshfsMount
from tpenv.engine.units import State
from tpenv.settings import Settings

WAIT = 30.0  # generous: a loaded 2-core machine
pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def sftp_servers():
    """open_sftp for SshfsMount: each call starts a local sftp-server; all killed at the end."""
    need_sshfs()
    procs = []

    async def open_sftp():
        p = await asyncio.create_subprocess_exec(SFTP_SERVER, stdin=asyncio.subprocess.PIPE,
                                                 stdout=asyncio.subprocess.PIPE)
        procs.append(p)
        return p.stdin, p.stdout

    yield open_sftp
    for p in procs:
        if p.returncode is None:
            p.kill()
            await p.wait()


def settings(interval: float) -> Settings:
    return Settings.model_validate({"mounts": {"probe_interval": interval, "probe_timeout": 3.0, "unmount_timeout": 5.0}})


async def until(predicate, timeout=WAIT):
    async with asyncio.timeout(timeout):
        while not predicate():  # the unit's health() is read, as `tpenv status` reads it
            await asyncio.sleep(0.1)


async def test_a_stopped_sshfs_fails_the_unit_and_is_abandoned(tmp_path, sftp_servers):
    # Stage 1: a working mount of a local directory.
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "f.txt").write_text("hello")
    m = SshfsMount(sftp_servers, tmp_path / "app.vol", name="app", settings=settings(0.5), remote=str(remote))
    await m.start()
    try:
        assert m.health().state is State.READY
        assert await m.check() is None
        pid = m.pid
        # Stage 2: sshfs stopped: the probe fails the unit with the reason, and the mount is gone.
        os.kill(pid, signal.SIGSTOP)
        await until(lambda: m.health().state is State.FAILED)
        assert f"sshfs (pid {pid}) is stopped" in m.health().last_error
        await until(lambda: not mounted(tmp_path / "app.vol") and not alive(pid))
    finally:
        # Stage 3: stop is quick and safe after the abandonment.
        async with asyncio.timeout(WAIT):
            await m.stop()
    assert not mounted(tmp_path / "app.vol") and not (tmp_path / "app.vol").exists()


async def test_stop_of_a_stuck_mount_with_a_reader_blocked_on_it(tmp_path, sftp_servers):
    # Stage 1: a mount whose probe would come too late to help; a process reading from it.
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "f.txt").write_text("hello")
    m = SshfsMount(sftp_servers, tmp_path / "app.vol", name="app", settings=settings(3600), remote=str(remote))
    await m.start()
    pid = m.pid
    os.kill(pid, signal.SIGSTOP)
    reader = await asyncio.create_subprocess_exec("cat", str(tmp_path / "app.vol" / "f.txt"),
                                                  stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    # Stage 2: stop() unmounts, kills sshfs, and the blocked reader is released (with an error).
    async with asyncio.timeout(WAIT):
        await m.stop()
        code = await reader.wait()
    assert code != 0
    assert not mounted(tmp_path / "app.vol") and not alive(pid)


async def test_abort_leaves_nothing_mounted(tmp_path, sftp_servers):
    remote = tmp_path / "remote"
    remote.mkdir()
    m = SshfsMount(sftp_servers, tmp_path / "app.vol", name="app", settings=settings(3600), remote=str(remote))
    await m.start()
    pid = m.pid
    os.kill(pid, signal.SIGSTOP)
    m.abort()  # synchronous: the second Ctrl-C
    assert not mounted(tmp_path / "app.vol")
    await until(lambda: not alive(pid))
    await m.stop()


DRIVER = """
import asyncio, sys
from tpenv.engine.mounts import SshfsMount

async def main():
    async def open_sftp():
        p = await asyncio.create_subprocess_exec(sys.argv[3], stdin=asyncio.subprocess.PIPE,
                                                 stdout=asyncio.subprocess.PIPE)
        return p.stdin, p.stdout
    m = SshfsMount(open_sftp, sys.argv[1], name="app", remote=sys.argv[2])
    await m.start()
    print("MOUNTED", m.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_mount_left_by_a_killed_session_is_cleared_by_the_next(tmp_path, sftp_servers, caplog):
    # Stage 1: a session (named like tpenv: a live one is never touched) mounts, its sshfs gets
    # stuck, and the session is killed with -9: the stuck sshfs cannot exit, the mount stays.
    remote = tmp_path / "remote"
    remote.mkdir()
    driver = tmp_path / "tpenv_driver.py"
    driver.write_text(DRIVER)
    import sys
    proc = await asyncio.create_subprocess_exec(sys.executable, str(driver), str(tmp_path / "app.vol"), str(remote),
                                                SFTP_SERVER, stdout=asyncio.subprocess.PIPE)
    async with asyncio.timeout(WAIT):
        line = await proc.stdout.readline()
    assert line.startswith(b"MOUNTED"), line
    pid = int(line.split()[1])
    os.kill(pid, signal.SIGSTOP)
    proc.kill()
    await proc.wait()
    assert mounted(tmp_path / "app.vol") and alive(pid)
    # Stage 2: the next session's mount clears it (orphaned sshfs killed, lazy unmount), says so, mounts.
    m = SshfsMount(sftp_servers, tmp_path / "app.vol", name="app", settings=settings(3600), remote=str(remote))
    async with asyncio.timeout(WAIT):
        await m.start()
    try:
        assert any("left behind by an earlier session" in r.getMessage() for r in caplog.records)
        await until(lambda: not alive(pid))
        assert m.pid != pid and mounted(tmp_path / "app.vol")
    finally:
        await m.stop()
    assert not mounted(tmp_path / "app.vol")
