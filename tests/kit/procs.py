"""Local processes as the tests see them."""
from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    """Running, not a zombie (PID 1 here may not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] != b"Z"
