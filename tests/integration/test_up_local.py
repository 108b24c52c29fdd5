"""`run_up` with local handlers only, as a real subprocess driven by a real telepresence.yaml:
only changed units restart, an invalid edit keeps the running state, Ctrl-C / SIGTERM / down
stop everything, a second Ctrl-C forces a quick exit."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from tests.kit.procs import alive
from tpenv.engine.up import format_status, run_down, run_status
from tpenv.settings import load_settings

PY = sys.executable
WAIT = 30.0  # deadline on a loaded 2-core machine; never a fixed sleep
pytestmark = pytest.mark.timeout(180)

HANDLER = """
    import os, signal, sys, time
    name, version = sys.argv[1], sys.argv[2]
    if "stubborn" in sys.argv:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("START", name, version, os.getpid(), os.environ.get("WHO"), flush=True)
    while True:
        time.sleep(1)
"""

DRIVER = """
    import asyncio, sys
    from tpenv.engine.up import run_up
    from tpenv.logs import setup_logging
    from tpenv.settings import load_settings
    setup_logging(debug=False, json=False)
    sys.exit(asyncio.run(run_up(sys.argv[1], load_settings())))
"""


def config(alpha="v1", beta="v1", extra=""):
    def ic(name, version, port):
        return f"""
  - name: {name}
    workload: {name}
    port: {port}:80
    env:
      set: {{WHO: {name}}}
    run:
      command: [{PY}, handler.py, {name}, {version}{extra}]
"""
    return "apiVersion: tpenv/v1\nnamespace: default\nintercepts:" + ic("alpha", alpha, 18081) + ic("beta", beta, 18082)


class Up:
    """A `tpenv up` driver subprocess whose stdout (handler output) and stderr (logs) can be awaited."""

    def __init__(self, tmp_path: Path, **settings: str):
        self.dir = tmp_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TPENV_SESSION_STATE_DIR": str(tmp_path / "sessions"),
                    "TPENV_HANDLERS_STOP_GRACE": "5", "TPENV_HANDLERS_TERM_GRACE": "5",
                    "TPENV_HANDLERS_DEBOUNCE": "0.05", **settings}
        self.settings = load_settings(self.env)
        self.lines: list[tuple[str, str]] = []
        self._cond = asyncio.Condition()
        (tmp_path / "handler.py").write_text(textwrap.dedent(HANDLER))
        (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))

    async def start(self, text: str) -> None:
        self.write(text)
        self.proc = await asyncio.create_subprocess_exec(
            PY, "driver.py", "telepresence.yaml", cwd=self.dir, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self._readers = [asyncio.create_task(self._read(self.proc.stdout, "out")),
                         asyncio.create_task(self._read(self.proc.stderr, "err"))]

    def write(self, text: str) -> None:
        tmp = self.dir / "telepresence.yaml.tmp"
        tmp.write_text(text)
        tmp.replace(self.dir / "telepresence.yaml")  # like an editor's atomic save

    async def _read(self, stream, which):
        while line := await stream.readline():
            async with self._cond:
                self.lines.append((which, line.decode().rstrip("\n")))
                self._cond.notify_all()

    async def line(self, which: str, needle: str, nth: int = 1) -> str:
        def found():
            hits = [t for w, t in self.lines if w == which and needle in t]
            return hits[nth - 1] if len(hits) >= nth else None

        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: found() is not None or self.proc.returncode is not None), WAIT)
            except TimeoutError:
                pass
        if found() is None:
            pytest.fail(f"no {which} line with {needle!r}; got:\n" + "\n".join(f"{w}: {t}" for w, t in self.lines))
        return found()

    async def started(self, name: str, version: str = "v1", nth: int = 1) -> int:
        line = await self.line("out", f"START {name} {version}", nth)
        assert line.startswith(f"[handler/{name}] "), line  # output carries the unit's prefix
        return int(line.split("START", 1)[1].split()[2])

    async def exit_code(self) -> int:
        code = await asyncio.wait_for(self.proc.wait(), WAIT)
        await asyncio.wait(self._readers, timeout=WAIT)
        return code

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for t in self._readers:
            t.cancel()


@pytest.fixture
async def up(tmp_path):
    u = Up(tmp_path)
    yield u
    await u.close()


def units_by_name(reply):
    return {tuple(u["key"])[1]: u for u in reply["units"]}


# --- stage 1: a spec change restarts only the changed unit --------------------------------------


async def test_spec_change_restarts_only_that_unit(up):
    await up.start(config())
    alpha, beta = await up.started("alpha"), await up.started("beta")
    assert (await up.line("out", "START alpha")).endswith(" alpha")  # env.set reached the handler

    up.write(config(beta="v2"))
    beta2 = await up.started("beta", "v2")
    assert beta2 != beta and not alive(beta) and alive(alpha)
    [reply] = await run_status(up.settings)
    units = units_by_name(reply)
    assert units["alpha"]["restarts"] == 0 and units["beta"]["restarts"] == 1
    assert {u["state"] for u in units.values()} == {"ready"}
    assert not [t for w, t in up.lines if "START alpha" in t][1:]  # alpha never restarted

    up.proc.send_signal(signal.SIGINT)
    assert await up.exit_code() == 0
    assert not alive(alpha) and not alive(beta2)


# --- stage 2: an invalid edit keeps the running state -------------------------------------------


async def test_invalid_config_keeps_the_running_state(up):
    await up.start(config())
    alpha, beta = await up.started("alpha"), await up.started("beta")

    up.write(config().replace("port: 18082:80", "port: nope"))
    error = await up.line("err", "config not applied")
    where = await up.line("err", "telepresence.yaml:")  # the problem names file:line:column
    assert "telepresence.yaml:" in where, error
    [reply] = await run_status(up.settings)
    assert "nope" in reply["config_error"] or "port" in reply["config_error"]
    assert "config not applied" in format_status([reply])
    assert alive(alpha) and alive(beta)
    assert {u["restarts"] for u in reply["units"]} == {0}

    up.write(config(alpha="v2"))  # valid again: applied, only alpha changes
    await up.started("alpha", "v2")
    await up.line("err", "config valid again")
    assert alive(beta)
    [reply] = await run_status(up.settings)
    assert reply["config_error"] is None

    up.proc.send_signal(signal.SIGTERM)
    assert await up.exit_code() == 0


# --- stage 3: stopping: signals and down ---------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_signal_stops_everything_cleanly(up, sig):
    await up.start(config())
    pids = [await up.started("alpha"), await up.started("beta")]
    up.proc.send_signal(sig)
    assert await up.exit_code() == 0
    assert not any(alive(p) for p in pids)
    assert list((up.dir / "sessions").iterdir()) == []  # the session is unpublished


async def test_down_and_status_from_another_process(up):
    await up.start(config())
    pids = [await up.started("alpha"), await up.started("beta")]
    [reply] = await run_status(up.settings)
    assert sorted(units_by_name(reply)) == ["alpha", "beta"]
    assert "handler/alpha" in format_status([reply])
    stopped = await run_down(up.settings, wait=WAIT)
    assert stopped == [reply["session"]["id"]]
    # down returned after the session had stopped its handlers
    assert not any(alive(p) for p in pids)
    assert await up.exit_code() == 0


async def test_second_sigint_forces_a_quick_exit(tmp_path):
    # Handlers that ignore SIGINT and SIGTERM, with graces far beyond the test's deadline:
    # only the forced path can end this in time.
    up = Up(tmp_path, TPENV_HANDLERS_STOP_GRACE="600", TPENV_HANDLERS_TERM_GRACE="600")
    try:
        await up.start(config(extra=", stubborn"))
        pids = [await up.started("alpha"), await up.started("beta")]
        up.proc.send_signal(signal.SIGINT)
        await up.line("err", "stopping everything")
        up.proc.send_signal(signal.SIGINT)
        assert await up.exit_code() == 130
        await up.line("err", "forced")
        for p in pids:  # SIGKILLed with their group; the kernel may take a moment
            deadline = asyncio.get_running_loop().time() + WAIT
            from tpenv.kits.procs import wait_gone
            await wait_gone([p], max(0.0, deadline - asyncio.get_running_loop().time()))
            assert not alive(p)
    finally:
        await up.close()
