"""What the local agent benches share (agent_passthrough.py, agent_regex.py): percentiles, and
sequential requests on one keep-alive connection timed one by one.

Both run a real sidecar in front of a local app on loopback; the HTTP/1.1 client is the agent
test kit's.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "agent" / "tests"))
from agent_testkit import Http1  # noqa: E402


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


async def keepalive_latencies(port: int, n: int, path: str = "/bench") -> list[float]:
    """Seconds each of ``n`` GETs of ``path`` took, one after another on one connection."""
    out = []
    async with Http1(port) as c:
        for _ in range(n):
            t = time.perf_counter()
            status, _, _ = await c.request(path)
            out.append(time.perf_counter() - t)
            assert status == 200
    return out
