"""bench/load.py's ``bulkloop`` task (bench/hol_cross.py's bulk): GETs back to back for a set time,
every byte counted, and a broken connection counted and replaced instead of ending the loop."""
from __future__ import annotations

import asyncio
import socket

import pytest

from bench import load


def test_it_moves_whole_bodies_for_the_time_given(served):
    # Stage 1: half a second of 1 MiB bodies from a real bench server on loopback.
    r = asyncio.run(load.t_bulkloop({"host": "127.0.0.1", "port": served, "bytes": 1 << 20, "seconds": 0.5}))
    # Stage 2: whole bodies only, at least one, the time at least what was asked, no error.
    assert r["errors"] == 0, r["error_samples"]
    assert r["bytes"] >= 1 << 20 and r["bytes"] % (1 << 20) == 0
    assert r["seconds"] >= 0.5 and r["MBps"] == pytest.approx(r["bytes"] / r["seconds"] / 1e6)


def test_a_refused_connection_is_counted_and_the_loop_goes_on():
    # A port nothing listens on: every attempt fails; the loop still ends on time with the count.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = asyncio.run(load.t_bulkloop({"host": "127.0.0.1", "port": port, "bytes": 1 << 20, "seconds": 0.3}))
    assert r["bytes"] == 0 and r["errors"] >= 2 and r["seconds"] >= 0.3
