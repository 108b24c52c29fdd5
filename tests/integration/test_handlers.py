"""Handlers with real processes: staged group stop, restart policy, restart on save, no orphans."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from tests.kit.procs import alive
from tpenv.engine.handlers import HandlerSpec
from tpenv.engine.units import State, UnitEvent
from tpenv.engine.watcher import FileWatcher, glob_to_regex
from tpenv.errors import MissingTool, NotFound
from tpenv.kits.procs import ProcessGroup, setpriv_prefix, wait_gone

PY = sys.executable
WAIT = 20.0  # generous deadline for a loaded 2-core machine; never a fixed sleep

pytestmark = pytest.mark.timeout(120)


class Lines:
    """An output sink that can be waited on."""

    def __init__(self):
        self.lines: list[str] = []
        self._cond = asyncio.Condition()
        self._loop = asyncio.get_running_loop()

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self._loop.create_task(self._poke())

    async def _poke(self):
        async with self._cond:
            self._cond.notify_all()

    async def wait_for(self, predicate, timeout=WAIT):
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(lambda: predicate(self.lines)), timeout)

    async def line_starting(self, prefix: str, nth: int = 1) -> str:
        await self.wait_for(lambda ls: sum(l.startswith(prefix) for l in ls) >= nth)
        return [l for l in self.lines if l.startswith(prefix)][nth - 1]


class Events:
    """The notify callable a unit gets; lets a test wait for a state."""

    def __init__(self):
        self.events: list[UnitEvent] = []
        self._cond = asyncio.Condition()
        self._loop = asyncio.get_running_loop()

    def __call__(self, event: UnitEvent) -> None:
        self.events.append(event)
        self._loop.create_task(self._poke())

    async def _poke(self):
        async with self._cond:
            self._cond.notify_all()

    async def until(self, predicate, timeout=WAIT):
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(predicate), timeout)


def script(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


# --- stage 1: the process group and its staged stop ------------------------------------------

FAMILY = """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    print("PIDS", os.getpid(), child.pid, flush=True)
    time.sleep(300)
"""


async def test_stop_reaches_the_grandchild(tmp_path):
    out = Lines()
    p = ProcessGroup([PY, str(script(tmp_path, "family.py", FAMILY))], output=out, name="family",
                     stop_grace=5.0, term_grace=5.0)
    async with p:
        _, parent, child = (await out.line_starting("PIDS")).split()
        parent, child = int(parent), int(child)
        assert parent == p.pid and alive(child)
    assert not alive(parent) and not alive(child)
    assert p.returncode == -signal.SIGINT or p.returncode == 1  # Python turns SIGINT into KeyboardInterrupt


STUBBORN = """
    import signal, time
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    def on_term(*_):
        print("got TERM", flush=True)
    signal.signal(signal.SIGTERM, on_term if {ignore_term} else signal.SIG_DFL)
    print("READY", flush=True)
    while True:
        time.sleep(1)
"""


@pytest.mark.parametrize("ignore_term, code", [(False, -signal.SIGTERM), (True, -signal.SIGKILL)])
async def test_ignoring_sigint_gets_term_then_kill(tmp_path, ignore_term, code):
    out = Lines()
    body = STUBBORN.replace("{ignore_term}", str(ignore_term))
    p = ProcessGroup([PY, str(script(tmp_path, "stubborn.py", body))], output=out, name="stubborn",
                     stop_grace=0.3, term_grace=0.5)
    await p.start()
    await out.line_starting("READY")
    assert await p.stop() == code
    assert ("got TERM" in out.lines) == ignore_term
    assert not alive(p.pid)
    assert await p.stop() == code  # safe twice


async def test_missing_program_is_a_clear_error(tmp_path):
    with pytest.raises(MissingTool, match="no-such-program"):
        await ProcessGroup(["no-such-program-xyz"], cwd=tmp_path).start()


async def test_missing_cwd_is_a_clear_error(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        await ProcessGroup([PY, "-c", "pass"], cwd=tmp_path / "nowhere").start()


async def test_output_is_relayed_line_by_line_even_without_a_final_newline(tmp_path):
    out = Lines()
    p = ProcessGroup([PY, "-c", "import sys; sys.stdout.write('a\\nb\\r\\n' + 'x' * 100000)"], output=out)
    async with p:
        await p.wait()
        await out.wait_for(lambda ls: len(ls) == 3)
    assert out.lines[:2] == ["a", "b"] and out.lines[2] == "x" * 100000


# --- stage 2: SIGKILL of tpenv leaves no handler ---------------------------------------------

DRIVER = """
    import asyncio, sys
    from pathlib import Path
    from tpenv.engine.handlers import HandlerSpec

    async def main():
        spec = HandlerSpec(name="orphan", argv=(sys.executable, "-c",
                           "import os, time; print('HANDLER', os.getpid(), flush=True); time.sleep(300)"),
                           cwd=Path("."), output=lambda line: print(line, flush=True))
        unit = spec.create(lambda event: None)
        await unit.start()
        await asyncio.Event().wait()

    asyncio.run(main())
"""


@pytest.mark.parametrize("mechanism", ["setpriv", "prctl"])
async def test_sigkill_of_the_driver_leaves_no_handler(tmp_path, mechanism):
    env = dict(os.environ)
    if mechanism == "prctl":
        env["PATH"] = str(tmp_path)  # no setpriv on PATH: the preexec_fn fallback is used
    elif not setpriv_prefix():
        pytest.fail("setpriv with --pdeathsig is missing: install util-linux")
    driver = await asyncio.create_subprocess_exec(PY, str(script(tmp_path, "driver.py", DRIVER)), cwd=tmp_path,
                                                  stdout=asyncio.subprocess.PIPE, env=env)
    try:
        line = await asyncio.wait_for(driver.stdout.readline(), WAIT)
        assert line.startswith(b"HANDLER"), line
        handler = int(line.split()[1])
        assert alive(handler)
    finally:
        driver.kill()  # SIGKILL: no cleanup code runs in the driver
        await driver.wait()
    # The kernel's parent-death signal kills the handler; wait for it with a deadline.
    await wait_gone([handler], WAIT)
    assert not alive(handler)


# --- stage 3: the handler unit's restart policy -----------------------------------------------


def spec(tmp_path, argv, **kw):
    kw.setdefault("restart_initial", 0.05)
    kw.setdefault("restart_max", 0.2)
    kw.setdefault("stop_grace", 2.0)
    kw.setdefault("term_grace", 2.0)
    return HandlerSpec(name=kw.pop("name", "web"), argv=tuple(argv), cwd=tmp_path, **kw)


async def test_crash_restarts_with_backoff(tmp_path):
    out, events = Lines(), Events()
    unit = spec(tmp_path, [PY, "-c", "import os; print('PID', os.getpid(), flush=True); raise SystemExit(3)"],
                output=out).create(events)
    await unit.start()
    try:
        await events.until(lambda: unit.health().restarts >= 3)
        assert unit.backoff.attempts >= 3  # consecutive crashes keep growing the delay
        assert unit.health().last_error == "exited with code 3"
        await out.line_starting("PID", 3)
        assert len({l for l in out.lines if l.startswith("PID")}) >= 3  # a new process each time
    finally:
        await unit.stop()
    assert unit.health().state is State.STOPPED


@pytest.mark.parametrize("policy, code, restarts", [("on-failure", 0, False), ("never", 3, False),
                                                     ("always", 0, True)])
async def test_restart_policy(tmp_path, policy, code, restarts):
    out, events = Lines(), Events()
    unit = spec(tmp_path, [PY, "-c", f"print('RUN', flush=True); raise SystemExit({code})"], restart=policy,
                output=out).create(events)
    await unit.start()
    try:
        if restarts:
            await events.until(lambda: unit.health().restarts >= 1)
        else:
            await events.until(lambda: unit.health().state in (State.STOPPED, State.FAILED))
            assert unit.health().restarts == 0
            assert unit.health().state is (State.FAILED if code else State.STOPPED)
    finally:
        await unit.stop()


async def test_handler_stop_ends_the_whole_family(tmp_path):
    out = Lines()
    unit = spec(tmp_path, [PY, str(script(tmp_path, "family.py", FAMILY))], output=out).create(lambda e: None)
    await unit.start()
    _, parent, child = (await out.line_starting("PIDS")).split()
    await unit.stop()
    assert not alive(int(parent)) and not alive(int(child))
    await unit.stop()  # safe twice


# --- stage 4: restart on save, with the fresh env ---------------------------------------------

SERVE = """
    import os, time
    print("GEN", os.environ["GEN"], flush=True)
    time.sleep(300)
"""


async def test_watched_file_restarts_with_fresh_env_and_ignored_file_does_not(tmp_path, caplog):
    (tmp_path / "src" / "vendor").mkdir(parents=True)
    (tmp_path / "src" / "app.py").write_text("v1")
    (tmp_path / "src" / "vendor" / "lib.py").write_text("v1")
    script(tmp_path, "serve.py", SERVE)
    caplog.set_level(logging.INFO, logger="tpenv")
    generation = 0

    def fresh_env():
        nonlocal generation
        generation += 1
        return {"GEN": str(generation)}

    out, events = Lines(), Events()
    unit = spec(tmp_path, [PY, "serve.py"], watch=("src/**/*.py",), ignore=("src/vendor/**",),
                env=fresh_env, output=out, debounce=0.05).create(events)
    await unit.start()
    try:
        await out.line_starting("GEN 1")
        # An ignored edit, then a watched one: exactly one restart, with the next env.
        (tmp_path / "src" / "vendor" / "lib.py").write_text("v2")
        (tmp_path / "src" / "app.py").write_text("v2")
        await out.line_starting("GEN 2")
        (tmp_path / "src" / "vendor" / "lib.py").write_text("v3")
        (tmp_path / "src" / "app.py").write_text("v3")
        await out.line_starting("GEN 3")
        assert unit.health().restarts == 2
        assert not any(l.startswith("GEN 4") for l in out.lines)
        changed = [r.getMessage() for r in caplog.records if "changed:" in r.getMessage()]
        assert changed and not any("vendor" in m for m in changed)
    finally:
        await unit.stop()


async def test_watcher_reports_only_matching_paths(tmp_path):
    (tmp_path / "a").mkdir()
    seen: list[set[str]] = []
    got = asyncio.Event()

    def on_change(paths):
        seen.append(paths)
        got.set()

    async with FileWatcher(tmp_path, ["a/*.txt"], ["a/skip*"], on_change=on_change, debounce=0.05):
        (tmp_path / "a" / "skip.txt").write_text("x")
        (tmp_path / "b.txt").write_text("x")
        (tmp_path / "a" / "keep.txt").write_text("x")
        await asyncio.wait_for(got.wait(), WAIT)
    assert set().union(*seen) == {"a/keep.txt"}


@pytest.mark.parametrize("glob, path, hit", [
    ("src/**/*.py", "src/app.py", True),
    ("src/**/*.py", "src/a/b/app.py", True),
    ("src/**/*.py", "lib/app.py", False),
    ("*.py", "src/app.py", False),
    ("*.py", "app.py", True),
    ("vendor/", "vendor/x/y.php", True),
    ("vendor/**", "vendor/x/y.php", True),
    ("./app.?s", "app.js", True),
    ("[!a]*.c", "b.c", True),
    ("[!a]*.c", "a.c", False),
    (".env", "xenv", False),
])
def test_glob_rules(glob, path, hit):
    assert bool(glob_to_regex(glob).match(path)) is hit


def test_setpriv_detection_is_consistent():
    prefix = setpriv_prefix()
    assert prefix == () or (os.path.basename(prefix[0]) == "setpriv" and "--pdeathsig" in prefix)


# --- stage 5: the signal a save restarts with (run.restart_signal) ----------------------------

SLEEPER = """
    import time
    print("UP", flush=True)
    time.sleep(300)
"""


@pytest.mark.parametrize("restart_signal, traceback", [("SIGTERM", False), ("SIGINT", True)])
async def test_a_save_restarts_with_restart_signal(tmp_path, restart_signal, traceback):
    # SIGTERM (the default) ends a Python server quietly; SIGINT shows its KeyboardInterrupt at every save.
    script(tmp_path, "sleeper.py", SLEEPER)
    out = Lines()
    unit = spec(tmp_path, [PY, "sleeper.py"], watch=("*.txt",), output=out, debounce=0.05,
                restart_signal=restart_signal).create(Events())
    await unit.start()
    try:
        await out.line_starting("UP")
        (tmp_path / "edit.txt").write_text("x")
        await out.line_starting("UP", nth=2)
        assert any("KeyboardInterrupt" in line for line in out.lines) is traceback
    finally:
        await unit.stop()
