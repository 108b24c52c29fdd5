"""What every part of the benchmark runner (bench/run.py) shares: where things are, the log, the units,
and the two exceptions by which a step says that its rows cannot be measured."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"

KiB, MiB = 1024, 1024 * 1024


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class Unavailable(Exception):
    """A row that cannot be measured in this run; the message says why."""


class PathLost(Unavailable):
    """Answers came from the wrong side: the intercept or the agent went away during the step."""
