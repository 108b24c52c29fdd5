"""Ctrl-C ends `tpenv up` even while a blocking call is stuck in a thread (an API request to a
server gone mid-request, a resolver that never answers): run_up's executor threads are daemons
that nothing joins (issue #19). A real subprocess, a real SIGINT."""
from __future__ import annotations

import asyncio
import signal
import sys
import textwrap

import pytest

WAIT = 30.0  # generous on a loaded machine; the stuck call below lasts 10 minutes
pytestmark = pytest.mark.timeout(120)

DRIVER = """
    import asyncio, sys, time
    from tpenv.engine.up import run_up
    from tpenv.settings import load_settings

    async def units(config, ctx):
        # A factory whose first pass starts a call that blocks its thread for 10 minutes.
        if not getattr(units, "started", False):
            units.started = True
            asyncio.ensure_future(asyncio.to_thread(time.sleep, 600))
            asyncio.get_running_loop().call_later(0.5, lambda: print("BLOCKED", flush=True))
        return {}

    sys.exit(asyncio.run(run_up(sys.argv[1], load_settings(), unit_factory=units)))
"""


async def test_ctrl_c_is_not_held_by_a_thread_stuck_in_a_blocking_call(tmp_path, monkeypatch):
    # Stage 1: a session whose unit factory left a thread blocked in a 10-minute call.
    (tmp_path / "telepresence.yaml").write_text("apiVersion: tpenv/v1\nnamespace: default\nintercepts: []\n")
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    monkeypatch.setenv("TPENV_SESSION_STATE_DIR", str(tmp_path / "sessions"))
    proc = await asyncio.create_subprocess_exec(sys.executable, "driver.py", "telepresence.yaml", cwd=tmp_path,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(WAIT):
            assert (await proc.stdout.readline()).startswith(b"BLOCKED")
        # Stage 2: one Ctrl-C: a clean exit, without waiting for that thread.
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
