"""`tpenv up` in a terminal shows the live table of units; through a pipe, plain lines.

Local-only sessions (no cluster) run on a real pseudo-terminal: an empty one, and one whose
handler fails and then recovers, where the row must follow (issue #19: never a stale note).
"""
from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

TPENV = str(Path(sys.executable).parent / "tpenv")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HEADER = re.compile(r"unit\s+state\s+since\s+restarts\s+note")


def write_config(tmp_path: Path) -> Path:
    """An empty session: no cluster needed, the table shows just its header."""
    cfg = tmp_path / "telepresence.yaml"
    cfg.write_text("apiVersion: tpenv/v1\nintercepts: []\n")
    return cfg


def read_until(fd: int, pattern: str, timeout: float) -> str:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if re.search(pattern, ANSI.sub("", out.decode(errors="replace"))):
                break
    return ANSI.sub("", out.decode(errors="replace"))


@contextlib.contextmanager
def on_a_pty(argv: list[str], cwd: Path, env: dict[str, str]):
    """``argv`` with a pty for its terminal, in its own session: (the process, the pty's master).
    Whatever the test does, the process is killed if it still runs, and the pty closed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, start_new_session=True, env=env)
    os.close(slave)
    try:
        yield proc, master
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def ctrl_c_stops_it(proc: subprocess.Popen, master: int) -> None:
    proc.send_signal(signal.SIGINT)
    read_until(master, r"stopped", 30)
    assert proc.wait(30) == 0


def test_terminal_gets_the_table_and_ctrl_c_stops(tmp_path):
    # -- stage 1: an empty session on a pty: the table's header is drawn ---------------------
    cfg = write_config(tmp_path)
    with on_a_pty([TPENV, "up", "-f", str(cfg)], tmp_path, {**os.environ, "COLUMNS": "120"}) as (proc, master):
        screen = read_until(master, HEADER.pattern, 30)
        assert HEADER.search(screen), screen

        # -- stage 2: Ctrl-C (SIGINT) stops the session cleanly ----------------------------
        ctrl_c_stops_it(proc, master)


def test_pipe_gets_plain_lines(tmp_path):
    cfg = write_config(tmp_path)
    proc = subprocess.Popen([TPENV, "up", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=tmp_path, text=True)
    line = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0
    assert "session" in line and not HEADER.search(line + rest)


# run_up with the live view and handlers only (the CLI's `up` asks the cluster for intercepts).
DRIVER = """
    import asyncio, sys
    from tpenv.engine.liveview import LiveView
    from tpenv.engine.up import run_up
    from tpenv.logs import setup_logging
    from tpenv.settings import load_settings
    setup_logging(debug=False, json=False)
    sys.exit(asyncio.run(run_up(sys.argv[1], load_settings(), view=LiveView)))
"""
BROKEN = "import sys\nsys.exit(3)\n"
FIXED = "import time\nwhile True:\n    time.sleep(1)\n"


def test_a_row_follows_its_unit_from_failed_to_ready(tmp_path):
    # -- stage 1: a handler that exits at once (restart: never, so it stays failed until a save) --
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    (tmp_path / "app.py").write_text(BROKEN)
    cfg = tmp_path / "telepresence.yaml"
    cfg.write_text("apiVersion: tpenv/v1\nnamespace: default\nintercepts:\n"
                   "  - {name: app, workload: app, port: '18090:80',\n"
                   f"     run: {{command: [{sys.executable}, app.py], watch: ['*.py'], restart: never}}}}\n")
    env = {**os.environ, "COLUMNS": "120", "TPENV_SESSION_STATE_DIR": str(tmp_path / "sessions"),
           "TPENV_HANDLERS_DEBOUNCE": "0.05"}
    with on_a_pty([sys.executable, "driver.py", str(cfg)], tmp_path, env) as (proc, master):
        # -- stage 2: the row says failed, with the reason as its note ------------------------------
        failed = r"handler/app\s+failed\s+\d+[smh]\s+exited with code 3"
        screen = read_until(master, failed, 30)
        assert re.search(failed, screen), screen
        # -- stage 3: a save fixes it: the same row turns ready, the reason replaced by the pid ------
        (tmp_path / "app.py").write_text(FIXED)
        ready = r"handler/app\s+ready\s+\d+[smh]\s+1\s+pid \d+"
        screen = read_until(master, ready, 30)
        assert re.search(ready, screen), screen
        rows = [line for line in screen.splitlines() if "handler/app" in line]
        assert "exited with code" not in rows[-1], rows
        # -- stage 4: Ctrl-C stops it cleanly ---------------------------------------------------------
        ctrl_c_stops_it(proc, master)
