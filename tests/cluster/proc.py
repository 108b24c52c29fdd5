"""Small process helpers for the cluster scripts: progress lines, commands, daemons with pid files.

Daemons are started in their own session (start_new_session) so they outlive the
`cluster up` that started them; their pid lives in <state>/pids/<name>.pid and their
output in <state>/logs/<name>.log. Standard library only.
"""
from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable


def say(msg: str) -> None:
    print(f"cluster: {msg}", flush=True)


def mounts_under(root: Path | str) -> list[str]:
    """Mount points at or below ``root``, deepest first (nested mounts go before their parents).

    ``root`` itself counts: the kubelet bind-mounts its root dir onto itself to make it shared,
    and `cluster up` does the same with /run/netns (network.py). Not os.path.ismount: a
    directory bound onto itself has the same device and inode.
    """
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return sorted((m for m in mounts if m == str(root) or m.startswith(str(root) + "/")), key=len, reverse=True)


def run(cmd: list[str], *, check: bool = True, quiet: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run a command; on failure show its output so the reader knows what to fix."""
    kw.setdefault("text", True)
    if quiet:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
    cp = subprocess.run([str(c) for c in cmd], **kw)
    if check and cp.returncode != 0:
        out = (cp.stdout or "") if quiet else ""
        raise RuntimeError(f"command failed (exit {cp.returncode}): {' '.join(map(str, cmd))}\n{out.strip()}")
    return cp


class Daemons:
    """Start/stop/inspect background daemons by name, with pid files under ``state``."""

    def __init__(self, state: Path) -> None:
        self.pids = state / "pids"
        self.logs = state / "logs"

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid(self, name: str) -> int | None:
        """The daemon's pid if it runs (and is still the program we started, not a reused pid)."""
        f = self.pids / f"{name}.pid"
        try:
            pid_s, exe = f.read_text().split("\n", 1)
            pid = int(pid_s)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, ValueError):
            return None
        if cmdline != exe.strip():
            return None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":  # a zombie is not running
                return None
        except OSError:
            return None
        return pid

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
        self.pids.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        cmd = [str(c) for c in cmd]
        with open(self.log_path(name), "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, env=env, close_fds=True)
        (self.pids / f"{name}.pid").write_text(f"{p.pid}\n{cmd[0]}\n")
        # Until exec() happens /proc/<pid>/cmdline is ours, and pid() would say "not running".
        deadline = time.monotonic() + 5
        while self.pid(name) is None and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return p.pid

    def stop(self, name: str, timeout: float = 10.0) -> bool:
        """SIGTERM, wait, then SIGKILL. True when something was running."""
        pid = self.pid(name)
        (self.pids / f"{name}.pid").unlink(missing_ok=True)
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                return True
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return True

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_for(what: str, check: Callable[[], bool], timeout: float, on_fail: Callable[[], str] | None = None,
             alive: Callable[[], bool] | None = None) -> None:
    """Poll ``check`` until true; raise with the daemon's log tail when it times out or dies."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - any failure just means "not yet"
            pass
        dead = alive is not None and not alive()
        if dead or time.monotonic() > deadline:
            why = "exited" if dead else f"not ready after {timeout:.0f}s"
            detail = on_fail() if on_fail else ""
            raise RuntimeError(f"{what} {why}\n{detail}")
        time.sleep(0.25)


def https_get(url: str, ca: Path | None = None, cert: tuple[Path, Path] | None = None, timeout: float = 3.0) -> str:
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    with urllib.request.urlopen(url, context=ctx if url.startswith("https") else None, timeout=timeout) as r:
        return r.read().decode()


def http_ok(url: str, **kw) -> bool:
    """True when the URL answers 2xx (urlopen raises on anything else)."""
    try:
        https_get(url, **kw)
        return True
    except Exception:  # noqa: BLE001
        return False
