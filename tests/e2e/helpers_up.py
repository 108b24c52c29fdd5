"""Helpers for e2e tests that run the real `tpenv` CLI as a subprocess (as a user would)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

TPENV = str(Path(sys.executable).parent / "tpenv")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> dict:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class TpenvProcess:
    """`tpenv ARGS` in the background, its output collected (and echoed on failure by the test)."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None, prefix: list[str] = ()) -> None:
        self.cmd = [*prefix, TPENV, *args]  # prefix: e.g. `ip netns exec LAPTOP` (tests/e2e/laptop_kit.py)
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env={**os.environ, **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM then wait; SIGKILL the group if it hangs (the test then fails on the code)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.wait(10)

    def __enter__(self) -> "TpenvProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def deadline_loop(seconds: float):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        yield end - time.monotonic()
