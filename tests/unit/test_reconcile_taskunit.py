"""tpenv.engine.units.TaskUnit: ready/fail/stop semantics, alone and under the Reconciler."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from tpenv.engine.reconciler import Reconciler
from tpenv.engine.units import State, TaskUnit
from tpenv.errors import TransientError, TunnelDropped

WAIT = 10.0


class Tunnel(TaskUnit):
    """Ready at once, then fails when `drop` is set, or returns when asked to stop."""

    def __init__(self, notify, behaviour="serve", drop=None):
        super().__init__(("tunnel", "ns", "pod-1"), "h", notify)
        self.behaviour, self.drop = behaviour, drop or asyncio.Event()
        self.clean_exit = False

    async def run(self, stopping, ready):
        if self.behaviour == "fail-early":
            raise TunnelDropped("port-forward refused")
        if self.behaviour == "end-early":
            return
        ready()
        waits = {asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(self.drop.wait())}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if self.drop.is_set() and not stopping.is_set():
            raise TunnelDropped("connection lost")
        self.clean_exit = True


class Sink(list):
    def __call__(self, event):
        self.append(event)


# --- stage 1: alone ----------------------------------------------------------------------------


async def test_ready_then_clean_stop_reports_no_failure():
    events = Sink()
    u = Tunnel(events)
    await u.start()
    assert u.health().state is State.READY
    await u.stop()
    await u.stop()  # safe twice
    assert u.clean_exit and u.health().state is State.STOPPED
    assert not [e for e in events if e.kind == "unit_failed"]
    assert u.log.extra.get("unit", u.log.extra.get("prefix", "")).strip("[]") == "tunnel/ns/pod-1"


@pytest.mark.parametrize("behaviour, error", [("fail-early", TunnelDropped), ("end-early", TransientError)])
async def test_failure_before_ready_fails_start(behaviour, error):
    events = Sink()
    with pytest.raises(error):
        await Tunnel(events, behaviour).start()
    assert not [e for e in events if e.kind == "unit_failed"]  # start() reports it, not notify


async def test_failure_after_ready_is_reported_once():
    events = Sink()
    u = Tunnel(events)
    await u.start()
    u.drop.set()
    await u._task.wait()
    failed = [e for e in events if e.kind == "unit_failed"]
    assert len(failed) == 1 and failed[0].error == "connection lost" and failed[0].key == u.key
    assert u.health().state is State.FAILED and u.health().last_error == "connection lost"
    await u.stop()


# --- stage 2: under the reconciler: a dropped tunnel comes back by itself ---------------------


@dataclass(frozen=True)
class TunnelSpec:
    drops: dict
    key: tuple = ("tunnel", "ns", "pod-1")
    spec_hash: str = "h"
    depends_on: frozenset = frozenset()

    def create(self, notify):
        u = Tunnel(notify)
        self.drops.setdefault("units", []).append(u)
        return u


async def test_reconciler_restarts_a_unit_that_failed_after_ready():
    spec = TunnelSpec({})
    rec = Reconciler(lambda: {spec.key: spec}, debounce=0.01, restart_initial=0.01, restart_max=0.05)
    async with rec:
        assert await rec.wait_until(lambda r: spec.key in r.running and r.running[spec.key].health().state is State.READY, WAIT)
        first = spec.drops["units"][0]
        first.drop.set()
        assert await rec.wait_until(lambda r: len(spec.drops["units"]) == 2
                                    and r.running.get(spec.key) is spec.drops["units"][1]
                                    and r.running[spec.key].health().state is State.READY, WAIT)
        [unit] = rec.snapshot()["units"]
        assert unit["restarts"] == 1 and unit["last_error"] == "connection lost"
    assert all(u.health().state is State.STOPPED for u in spec.drops["units"])
