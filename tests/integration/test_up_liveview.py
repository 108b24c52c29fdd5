"""`tpenv up` in a terminal shows the live table of units; through a pipe, plain lines.

A local-only session (one handler, no cluster) run on a real pseudo-terminal.
"""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
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


def test_terminal_gets_the_table_and_ctrl_c_stops(tmp_path):
    # -- stage 1: an empty session on a pty: the table's header is drawn ---------------------
    cfg = write_config(tmp_path)
    master, slave = pty.openpty()
    proc = subprocess.Popen([TPENV, "up", "-f", str(cfg)], stdin=slave, stdout=slave, stderr=slave,
                            cwd=tmp_path, start_new_session=True, env={**os.environ, "COLUMNS": "120"})
    os.close(slave)
    try:
        screen = read_until(master, HEADER.pattern, 30)
        assert HEADER.search(screen), screen

        # -- stage 2: Ctrl-C (SIGINT) stops the session cleanly ----------------------------
        proc.send_signal(signal.SIGINT)
        read_until(master, r"stopped", 30)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_pipe_gets_plain_lines(tmp_path):
    cfg = write_config(tmp_path)
    proc = subprocess.Popen([TPENV, "up", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=tmp_path, text=True)
    line = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0
    assert "session" in line and not HEADER.search(line + rest)
