"""The host capture's iptables fallback (tpenv/kits/capture_iptables.py) neither hangs nor holds
the event loop (issue #19): every iptables command is bounded, and HostCapture runs them in a thread.

A stand-in ``iptables`` first on PATH (a shell script) plays a slow or stuck one, e.g. another
program holding the xtables lock; it logs its arguments and changes nothing on this machine.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tpenv.errors import TransientError
from tpenv.kits import capture_iptables
from tpenv.kits.capture_host import HostCapture

WAIT = 20.0  # deadline for anything to happen on a loaded 2-core machine; never a fixed sleep
pytestmark = pytest.mark.timeout(120)

# Waits (at most 10 s, then says so) until the test creates `release`; `-S` (is the chain there?) answers no.
FAKE = """#!/bin/sh
echo "$*" >> {dir}/calls
touch {dir}/started
i=0
while [ ! -e {dir}/release ]; do
  i=$((i + 1))
  if [ $i -gt 200 ]; then touch {dir}/timed_out; break; fi
  sleep 0.05
done
case "$*" in *" -S "*) exit 1 ;; esac
exit 0
"""


def fake_iptables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "iptables"
    script.write_text(FAKE.format(dir=tmp_path))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_a_stuck_iptables_is_an_error_not_a_hang(tmp_path, monkeypatch):
    # Stage 1: an iptables that never finishes (never released), a short bound for the test.
    fake_iptables(tmp_path, monkeypatch)
    monkeypatch.setattr(capture_iptables, "IPTABLES_TIMEOUT", 0.5)
    # Stage 2: the sweep gives up with an error saying what did not finish, and what to do.
    with pytest.raises(TransientError, match=r"iptables -S TPENV-CONNECT did not finish within") as e:
        capture_iptables.sweep()
    assert "xtables lock" in (e.value.hint or "")


async def test_the_host_capture_runs_iptables_off_the_loop(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.fail("the host capture needs root: run this test as root")
    d = fake_iptables(tmp_path, monkeypatch)

    async def on_connection(*args):  # nothing connects in this test
        raise AssertionError(args)

    cap = HostCapture(["10.199.0.0/16"], on_connection, backend="iptables")
    starting = asyncio.ensure_future(cap.start())
    try:
        # Stage 1: the first iptables command waits for the test, which sees it from the loop:
        # possible only while the loop is free (a call on the loop would hold it until the fake gives up).
        async with asyncio.timeout(WAIT):
            while not (d / "started").exists():
                await asyncio.sleep(0.05)  # a file made by another process: nothing to wait on but time
        (d / "release").touch()
        async with asyncio.timeout(WAIT):
            await starting
        assert not (d / "timed_out").exists(), "an iptables call held the event loop"
        # Stage 2: the chain was swept, made, filled and jumped to, each call with a bounded lock wait.
        calls = (d / "calls").read_text().splitlines()
        assert calls[0] == "-w 5 -t nat -S TPENV-CONNECT" and "-w 5 -t nat -N TPENV-CONNECT" in calls, calls
        assert calls[-1] == "-w 5 -t nat -I OUTPUT -j TPENV-CONNECT", calls
    finally:
        (d / "release").touch()
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        cap.close()
        await cap.wait_closed()
