"""`tpenv doctor`'s mount check against real stale sshfs mounts: one whose sshfs was killed
(the kernel answers ENOTCONN), one whose sshfs is stopped (anything touching it hangs), one live.
The check must name both, never hang on the stuck one, and `--fix` must detach both; then the
process must exit (a thread of its own stuck in a stat could never be joined)."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from local_sshfs import LocalSshfs, mounted
from tpenv.engine.doctor import FAIL, OK, repair, run_check
from tpenv.engine.doctor import machine

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 2.0


async def test_a_dead_and_a_stuck_mount_are_named_and_detached_and_nothing_hangs(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "f.txt").write_text("x\n")
    mounts = {name: await LocalSshfs(served, tmp_path / name).start() for name in ("dead", "stuck", "live")}
    try:
        # Stage 1: one sshfs killed, one stopped.
        mounts["dead"].sshfs.kill()
        mounts["dead"].sshfs.wait()
        os.kill(mounts["stuck"].sshfs.pid, signal.SIGSTOP)

        # Stage 2: the check answers within its bound and names each for what it is.
        start = time.monotonic()
        found = await run_check("machine/mounts", machine.stale_mounts(TIMEOUT))
        assert time.monotonic() - start < TIMEOUT + 10
        assert found.status == FAIL and found.fixable, found.detail
        assert f"connection is gone: {tmp_path / 'dead'}" in found.detail, found.detail
        assert f"not answering within {TIMEOUT:g}s" in found.detail and str(tmp_path / "stuck") in found.detail
        assert str(tmp_path / "live") not in found.detail

        # Stage 3: --fix detaches both (lazily: the stuck one's sshfs still stopped), the live one stays.
        await repair([found])
        assert not mounted(tmp_path / "dead") and not mounted(tmp_path / "stuck") and mounted(tmp_path / "live")
        assert sorted(found.changed) == [f"unmounted {tmp_path / 'dead'}", f"unmounted {tmp_path / 'stuck'}"]
        assert (await run_check("machine/mounts", machine.stale_mounts(TIMEOUT))).status == OK
    finally:
        if mounts["stuck"].sshfs.poll() is None:
            os.kill(mounts["stuck"].sshfs.pid, signal.SIGCONT)
        for m in mounts.values():
            m.close()


async def test_doctor_exits_after_its_report_with_a_stuck_mount_on_the_machine(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    stuck = await LocalSshfs(served, tmp_path / "stuck").start()
    os.kill(stuck.sshfs.pid, signal.SIGSTOP)
    try:
        # The machine checks alone (no cluster: --no-cluster is not a flag, so a kubeconfig that
        # points nowhere makes the cluster part fail fast); the process must end by itself.
        env = {**os.environ, "KUBECONFIG": str(tmp_path / "none"), "TPENV_MOUNTS_PROBE_TIMEOUT": str(TIMEOUT),
               "TPENV_SESSION_STATE_DIR": str(tmp_path / "state")}
        cp = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "tpenv.cli.main", "-o", "json", "doctor"],
                                     capture_output=True, text=True, env=env, timeout=90)
        assert str(tmp_path / "stuck") in cp.stdout, cp.stdout + cp.stderr
        assert cp.returncode == 1
    finally:
        os.kill(stuck.sshfs.pid, signal.SIGCONT)
        stuck.close()
