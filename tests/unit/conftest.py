"""Fixtures shared by the unit tests of bench/ (its load tasks and its server)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def served():
    """bench/server.py on 127.0.0.1, a port of its own choosing; its port."""
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "server.py"), "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(10)
