"""tpenv.kits.aio: named tasks end in a logged, recorded way; the staged stop; the backoff."""
from __future__ import annotations

import asyncio
import logging

import pytest

from tpenv.kits.aio import Backoff, NamedTask, stop_all, wait_event

# --- stage 1: the guard records and logs how a task ended ---------------------------------


async def test_finished_task_keeps_result_and_calls_on_done():
    ended = asyncio.Event()

    async def body(stopping):
        return 42

    t = NamedTask("test", "ok", body, on_done=lambda _t: ended.set())
    await t.wait()
    assert t.result == 42 and t.error is None and not t.cancelled
    assert ended.is_set()


async def test_failed_task_records_the_exception_and_logs_with_prefix(caplog):
    caplog.set_level(logging.DEBUG, logger="tpenv")

    async def body(stopping):
        raise RuntimeError("boom")

    t = NamedTask("test", "bad", body)
    await t.wait()
    assert isinstance(t.error, RuntimeError)
    assert any("[test/bad]" in r.getMessage() and "boom" in r.getMessage() for r in caplog.records)


# --- stage 2: staged stop: signal, grace, cancel ------------------------------------------


async def test_stop_signals_first_and_the_body_returns_cleanly():
    async def body(stopping):
        await stopping.wait()
        return "clean"

    t = NamedTask("test", "polite", body)
    assert await t.stop(grace=5.0)
    assert t.result == "clean" and not t.cancelled


async def test_stop_cancels_a_body_that_ignores_the_signal():
    async def body(stopping):
        await asyncio.Event().wait()  # never looks at stopping

    t = NamedTask("test", "deaf", body)
    assert await t.stop(grace=0.05)
    assert t.cancelled


async def test_stop_warns_when_the_task_outlives_cancel(caplog):
    caplog.set_level(logging.WARNING, logger="tpenv")
    release = asyncio.Event()

    async def body(stopping):
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # swallows cancellation: the misbehaviour stop() must report

    t = NamedTask("test", "stubborn", body, cancel_wait=0.05)
    assert not await t.stop(grace=0.01)
    assert any("still running" in r.getMessage() for r in caplog.records)
    release.set()
    await t.wait()


async def test_stop_is_safe_twice_and_as_context_manager():
    async def body(stopping):
        await stopping.wait()

    async with NamedTask("test", "ctx", body) as t:
        pass
    assert t.done
    assert await t.stop() and await t.close()
    await t.wait_closed()


async def test_stop_all_stops_every_task():
    async def body(stopping):
        await stopping.wait()

    tasks = [NamedTask("test", str(i), body) for i in range(3)]
    assert await stop_all(tasks, grace=5.0)
    assert all(t.done for t in tasks)


async def test_wait_event_reports_timeout_and_set():
    ev = asyncio.Event()
    assert not await wait_event(ev, 0.01)
    ev.set()
    assert await wait_event(ev, 0.01)


# --- stage 3: backoff: exponential, jittered, capped, reset after healthy -----------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_backoff_grows_exponentially_and_caps_without_jitter():
    b = Backoff(0.5, 4.0, jitter=0.0)
    assert [b.failed() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


@pytest.mark.parametrize("r", [0.0, 0.5, 0.999])
def test_backoff_jitter_stays_within_bounds_and_below_maximum(r):
    b = Backoff(1.0, 8.0, jitter=0.25, rng=lambda: r)
    delays = [b.failed() for _ in range(6)]
    for i, d in enumerate(delays):
        base = min(8.0, 2.0**i)
        assert base * 0.75 <= d <= min(8.0, base * 1.25)


def test_backoff_resets_after_a_healthy_period_only():
    clock = Clock()
    b = Backoff(1.0, 30.0, jitter=0.0, healthy_after=10.0, clock=clock)
    b.started(); clock.now += 1
    assert b.failed() == 1.0
    b.started(); clock.now += 1
    assert b.failed() == 2.0  # ran briefly: still counting
    b.started(); clock.now += 10
    assert b.failed() == 1.0  # ran long enough: counts as a first failure again
    b.reset()
    assert b.attempts == 0


def test_backoff_survives_many_failures():
    b = Backoff(0.5, 30.0, jitter=0.0)
    for _ in range(2000):
        d = b.failed()
    assert d == 30.0


def test_backoff_rejects_nonsense():
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)
