"""tpenv.engine.reconciler.Reconciler: the loop, with fake units (pure logic) and real asyncio."""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

import pytest

from tpenv.engine.reconciler import Reconciler
from tpenv.engine.units import State, UnitEvent, UnitState
from tpenv.errors import ConfigError, NotFound, RolloutStalled, TransientError, TunnelDropped

WAIT = 10.0  # deadline for anything to happen; never a fixed sleep


@dataclass
class World:
    """What the fake units did, in order, and knobs to make them fail."""

    journal: list = field(default_factory=list)
    fail_starts: dict = field(default_factory=dict)  # key -> how many starts raise
    fail_with: type = RuntimeError
    units: dict = field(default_factory=dict)  # key -> the latest unit instance


class FakeUnit:
    def __init__(self, spec, notify):
        self.spec, self.notify = spec, notify
        self.key, self.spec_hash, self.depends_on = spec.key, spec.spec_hash, spec.depends_on
        self.state = UnitState()
        self.aborted = False

    async def start(self):
        w = self.spec.world
        w.journal.append(("start", self.key))
        if w.fail_starts.get(self.key, 0) > 0:
            w.fail_starts[self.key] -= 1
            raise w.fail_with(f"cannot start {self.key[-1]}")
        self.state.set(State.READY)

    async def stop(self):
        if self.state.state is not State.STOPPED:
            self.spec.world.journal.append(("stop", self.key))
        self.state.set(State.STOPPED)

    def health(self):
        return self.state

    def abort(self):
        self.aborted = True


@dataclass(frozen=True)
class FakeSpec:
    key: tuple
    spec_hash: str
    world: World = field(compare=False)
    depends_on: frozenset = frozenset()

    def create(self, notify):
        u = FakeUnit(self, notify)
        self.world.units[self.key] = u
        return u


T, I, H = ("tunnel", "p"), ("intercept", "web"), ("handler", "web")


class Desired:
    """The desired function: returns the current specs, or raises the configured error."""

    def __init__(self, world):
        self.world = world
        self.specs = {}
        self.error = None

    def set(self, *specs):
        self.specs = {s.key: s for s in specs}

    def spec(self, key, h="1", deps=()):
        return FakeSpec(key, h, self.world, frozenset(deps))

    def __call__(self):
        if self.error:
            raise self.error
        return dict(self.specs)


def state_of(rec, key):
    for u in rec.snapshot()["units"]:
        if tuple(u["key"]) == key:
            return u
    return None


def hash_of(rec, key):
    unit = rec.running.get(key)
    return unit.spec_hash if unit is not None else None


def all_ready(*keys):
    return lambda rec: all((s := state_of(rec, k)) and s["state"] == "ready" for k in keys)


@pytest.fixture
def world():
    return World()


@pytest.fixture
def desired(world):
    d = Desired(world)
    d.set(d.spec(T), d.spec(I, deps=[T]), d.spec(H))
    return d


def fast(desired):
    return Reconciler(desired, debounce=0.02, restart_initial=0.02, restart_max=0.1, stop_timeout=5)


# --- stage 1: bring up and shut down in dependency order -----------------------------------


async def test_starts_dependencies_first_and_stops_dependents_first(world, desired):
    async with fast(desired) as rec:
        assert await rec.wait_until(all_ready(T, I, H), WAIT)
        starts = [k for op, k in world.journal if op == "start"]
        assert starts.index(T) < starts.index(I) and set(starts) == {T, I, H}
    stops = [k for op, k in world.journal if op == "stop"]
    assert set(stops) == {T, I, H} and stops.index(I) < stops.index(T)
    assert rec.stopped.is_set() and rec.running == {}


# --- stage 2: config changes: only what changed moves ----------------------------------------


async def test_spec_change_restarts_only_that_unit(world, desired):
    async with fast(desired) as rec:
        assert await rec.wait_until(all_ready(T, I, H), WAIT)
        world.journal.clear()
        desired.set(desired.spec(T), desired.spec(I, deps=[T]), desired.spec(H, "2"))
        rec.notify(UnitEvent("config"))
        assert await rec.wait_until(lambda r: hash_of(r, H) == "2" and all_ready(H)(r), WAIT)
        assert world.journal == [("stop", H), ("start", H)]


async def test_dependency_change_restarts_its_dependents_around_it(world, desired):
    async with fast(desired) as rec:
        assert await rec.wait_until(all_ready(T, I, H), WAIT)
        world.journal.clear()
        desired.set(desired.spec(T, "2"), desired.spec(I, deps=[T]), desired.spec(H))
        rec.notify(UnitEvent("kube"))
        assert await rec.wait_until(lambda r: hash_of(r, T) == "2" and all_ready(T, I)(r), WAIT)
        assert world.journal == [("stop", I), ("stop", T), ("start", T), ("start", I)]


async def test_invalid_config_keeps_the_running_state_and_recovers(world, desired):
    async with fast(desired) as rec:
        assert await rec.wait_until(all_ready(T, I, H), WAIT)
        world.journal.clear()
        desired.error = ConfigError("telepresence.yaml line 3: bad")
        rec.notify(UnitEvent("config"))
        assert await rec.wait_until(lambda r: r.config_error is not None, WAIT)
        assert "line 3" in rec.snapshot()["config_error"]
        assert world.journal == [] and set(rec.running) == {T, I, H}
        desired.error = None
        desired.set(desired.spec(T), desired.spec(I, deps=[T]))
        rec.notify(UnitEvent("config"))
        assert await rec.wait_until(lambda r: r.config_error is None and H not in r.running, WAIT)
        assert world.journal == [("stop", H)]
        assert state_of(rec, H) is None  # a removed unit leaves the status too


async def test_dependency_cycle_is_reported_like_an_invalid_config(world, desired):
    async with fast(desired) as rec:
        assert await rec.wait_until(all_ready(T, I, H), WAIT)
        desired.set(desired.spec(T, deps=[I]), desired.spec(I, deps=[T]))
        rec.notify(UnitEvent("config"))
        assert await rec.wait_until(lambda r: r.config_error is not None, WAIT)
        assert "cycle" in rec.config_error and set(rec.running) == {T, I, H}


async def test_a_burst_of_events_is_one_pass(world, desired):
    async with fast(desired) as rec:
        assert await rec.wait_until(all_ready(T, I, H), WAIT)
        before = rec.passes
        for _ in range(20):
            rec.notify(UnitEvent("file_changed"))
        assert await rec.wait_until(lambda r: r.passes > before and r.queue.empty(), WAIT)
        # the 20 events were queued before the loop woke up: they coalesce into one pass
        assert rec.passes == before + 1


# --- stage 3: failures retry with backoff ---------------------------------------------------


async def test_failed_start_is_retried_with_backoff_and_counted(world, desired):
    world.fail_starts[H] = 2
    async with fast(desired) as rec:
        assert await rec.wait_until(all_ready(T, I, H), WAIT)
        assert [k for op, k in world.journal if op == "start"].count(H) == 3
        s = state_of(rec, H)
        assert s["restarts"] == 2 and "cannot start" in s["last_error"]


async def test_failed_dependency_holds_its_dependent_pending(world, desired):
    world.fail_starts[T] = 1
    rec = Reconciler(desired, debounce=0.02, restart_initial=30.0, restart_max=30.0)
    async with rec:
        assert await rec.wait_until(lambda r: "waiting" in ((state_of(r, I) or {}).get("detail") or ""), WAIT)
        assert state_of(rec, I)["state"] == "pending"
        assert state_of(rec, I)["detail"] == "waiting for tunnel/p"
        assert state_of(rec, T)["state"] == "failed" and "retry in" in state_of(rec, T)["detail"]
        assert I not in rec.running


async def test_unit_reported_failure_restarts_it_and_its_dependents(world, desired):
    async with fast(desired) as rec:
        assert await rec.wait_until(all_ready(T, I, H), WAIT)
        world.journal.clear()
        world.units[T].notify(UnitEvent("unit_failed", error="tunnel dropped"))
        assert await rec.wait_until(lambda r: all_ready(T, I)(r) and state_of(r, T)["restarts"] == 1, WAIT)
        assert world.journal == [("stop", I), ("stop", T), ("start", T), ("start", I)]
        assert state_of(rec, T)["last_error"] == "tunnel dropped"


async def test_late_failure_of_a_replaced_unit_is_ignored(world, desired):
    async with fast(desired) as rec:
        assert await rec.wait_until(all_ready(T, I, H), WAIT)
        old = world.units[H]
        desired.set(desired.spec(T), desired.spec(I, deps=[T]), desired.spec(H, "2"))
        rec.notify(UnitEvent("config"))
        assert await rec.wait_until(lambda r: hash_of(r, H) == "2" and all_ready(H)(r), WAIT)
        world.journal.clear()
        before = rec.passes
        old.notify(UnitEvent("unit_failed", error="old news"))
        assert await rec.wait_until(lambda r: r.passes > before, WAIT)
        assert world.journal == [] and state_of(rec, H)["last_error"] is None


async def test_permanent_failure_retries_on_the_next_outside_event(world, desired):
    world.fail_starts[H] = 1
    world.fail_with = NotFound
    rec = Reconciler(desired, debounce=0.02, restart_initial=30.0, restart_max=30.0)
    async with rec:
        assert await rec.wait_until(lambda r: (s := state_of(r, H)) and s["state"] == "failed", WAIT)
        assert "next change" in state_of(rec, H)["detail"]
        rec.notify(UnitEvent("kube", detail="workload created"))  # long before the 30 s backoff
        assert await rec.wait_until(all_ready(H), WAIT)


async def test_a_failed_unit_keeps_its_error_whole(world, desired):
    """The status has the text; rec.errors the exception as raised, kind and hint intact, so a
    verb reports a MissingTool with its hint rather than a rebuilt guess from the message."""
    world.fail_starts[H] = 1
    world.fail_with = NotFound
    rec = Reconciler(desired, debounce=0.02, restart_initial=30.0, restart_max=30.0)
    async with rec:
        assert await rec.wait_until(lambda r: (s := state_of(r, H)) and s["state"] == "failed", WAIT)
        assert type(rec.errors[H]) is NotFound and str(rec.errors[H]) == state_of(rec, H)["last_error"]


async def test_the_failure_log_line_says_what_to_do(world, desired, caplog):
    """`tpenv up` shows a unit's failure as this log line only: the error's hint goes with it."""
    world.fail_starts[H] = 1
    world.fail_with = lambda msg: NotFound(msg, hint="install it with `tpenv manager install`")
    rec = Reconciler(desired, debounce=0.02, restart_initial=30.0, restart_max=30.0)
    with caplog.at_level("WARNING"):
        async with rec:
            assert await rec.wait_until(lambda r: (s := state_of(r, H)) and s["state"] == "failed", WAIT)
    line = next(r.getMessage() for r in caplog.records if " failed: " in r.getMessage())
    assert re.search(r"failed: cannot start web; install it with `tpenv manager install` \(retry in [\d.]+s\)$", line), line
    assert "tpenv manager install" not in state_of(rec, H)["last_error"]  # the status: the error's own text


async def test_a_transient_error_waits_its_retry_after_even_past_the_backoff_cap(world, desired):
    # The backoff alone would retry within restart_max (0.1 s); the error asks for 30 s.
    world.fail_starts[H] = 1
    world.fail_with = lambda msg: TransientError(msg, retry_after=30.0)
    async with fast(desired) as rec:
        assert await rec.wait_until(lambda r: (s := state_of(r, H)) and s["state"] == "failed", WAIT)
        assert state_of(rec, H)["detail"] == "retry in 30.0s"  # no "or on the next change": not permanent
        # Transient, so an outside change does not cut the wait short (only a permanent one does).
        before = rec.passes
        rec.notify(UnitEvent("kube", detail="something else changed"))
        assert await rec.wait_until(lambda r: r.passes > before, WAIT)
        assert [k for op, k in world.journal if op == "start"].count(H) == 1
        assert state_of(rec, H)["state"] == "failed" and isinstance(rec.errors[H], TransientError)


async def test_the_retry_after_of_the_errors_class_counts_and_a_short_one_retries_soon(world, desired):
    world.fail_starts[H] = 1
    world.fail_with = RolloutStalled  # retry_after 5.0 by its class
    async with fast(desired) as rec:
        assert await rec.wait_until(lambda r: (s := state_of(r, H)) and s["state"] == "failed", WAIT)
        assert state_of(rec, H)["detail"] == "retry in 5.0s"
    world.journal.clear()
    world.fail_starts[H] = 1
    world.fail_with = lambda msg: TransientError(msg, retry_after=0.05)
    async with fast(desired) as rec:
        assert await rec.wait_until(all_ready(T, I, H), WAIT)
        assert [k for op, k in world.journal if op == "start"].count(H) == 2


async def test_a_unit_reporting_a_typed_failure_is_retried_by_its_type(world, desired):
    # A running unit's exception travels with its report: its kind in rec.errors, its retry_after honoured.
    async with fast(desired) as rec:
        assert await rec.wait_until(all_ready(T, I, H), WAIT)
        world.units[T].notify(UnitEvent("unit_failed", error="gone", exc=TunnelDropped("gone", retry_after=30.0)))
        assert await rec.wait_until(lambda r: (s := state_of(r, T)) and s["state"] == "failed", WAIT)
        assert state_of(rec, T)["detail"] == "retry in 30.0s" and type(rec.errors[T]) is TunnelDropped
        assert state_of(rec, I)["state"] == "pending"  # its dependent waits for it


async def test_a_foreign_error_is_transient_on_the_backoff_alone(world, desired):
    world.fail_starts[H] = 1  # RuntimeError: no type of ours, no retry_after; the backoff's curve decides
    rec = Reconciler(desired, debounce=0.02, restart_initial=30.0, restart_max=30.0)
    async with rec:
        assert await rec.wait_until(lambda r: (s := state_of(r, H)) and s["state"] == "failed", WAIT)
        detail = state_of(rec, H)["detail"]
        assert detail.startswith("retry in ") and "next change" not in detail
        assert 24.0 <= float(detail.removeprefix("retry in ").removesuffix("s")) <= 30.0  # 30 s, jitter 20 %


# --- stage 4: stop and abort ------------------------------------------------------------------


async def test_close_is_safe_twice_and_abort_reaches_running_units(world, desired):
    rec = fast(desired)
    async with rec:
        assert await rec.wait_until(all_ready(T, I, H), WAIT)
        units = dict(world.units)
        rec.abort()
        assert all(u.aborted for u in units.values())
    await rec.close()
    assert rec.snapshot()["stopping"] and rec.running == {}


async def test_stop_interrupts_a_slow_start(world, desired):
    gate = asyncio.Event()

    class Slow(FakeUnit):
        async def start(self):
            await gate.wait()

    class SlowSpec(FakeSpec):
        def create(self, notify):
            return Slow(self, notify)

    desired.set(SlowSpec(H, "1", world))
    rec = fast(desired)
    async with rec:
        assert await rec.wait_until(lambda r: H in r.running, WAIT)
    assert rec.running == {}  # the stop did not wait for the start to finish


async def test_events_from_another_thread_wake_the_loop(world, desired):
    import threading

    async with fast(desired) as rec:
        assert await rec.wait_until(all_ready(T, I, H), WAIT)
        desired.set(desired.spec(T), desired.spec(I, deps=[T]))
        loop = asyncio.get_running_loop()
        threading.Thread(target=rec.notify_threadsafe, args=(UnitEvent("kube"), loop)).start()
        assert await rec.wait_until(lambda r: H not in r.running, WAIT)
