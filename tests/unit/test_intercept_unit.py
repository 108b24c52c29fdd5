"""`tpenv up`'s intercept unit (engine/intercept_unit.py) around a fake InterceptRun (pure logic, real asyncio):

- its note is its current state: the rollout's last "Waiting for ..." line is replaced once the
  rollout is over, and cleared once the intercept serves (issue #19: no stale note);
- the handler may start once the tunnels and the env are there, while the route probe still runs:
  the unit says "serving" (runs and ready_hashes filled, a kube event) and is READY only once
  routed (issue 13: the handler's start overlaps kube-proxy's sync);
- the second Ctrl-C (Reconciler.abort) reaches the run's own abort, which kills sshfs and
  detaches the mount: cancelling the unit's task alone never ran it (issue #19).
"""
from __future__ import annotations

import asyncio

import pytest

from tpenv.config.models import Intercept
from tpenv.engine import intercept_unit as intercept_unit_mod
from tpenv.engine.intercept_unit import InterceptSpec, InterceptUnit
from tpenv.engine.reconciler import Reconciler
from tpenv.engine.units import State
from tpenv.settings import Settings

WAIT = 10.0  # deadline for anything to happen; never a fixed sleep
ROLLOUT_LINE = "Waiting for deployment/cart: 1/2 pods ready"


class FakeRun:
    """An InterceptRun that says one rollout line, then serves when the test says so; routed at once
    unless the test holds ``routed`` (cleared)."""

    made: list["FakeRun"] = []

    def __init__(self, kube, intercept, namespace, session_id, settings, *, progress=None, base_dir=None):
        self.progress = progress
        self.serving = asyncio.Event()
        self.routed = asyncio.Event()
        self.routed.set()
        self.started = asyncio.Event()
        self.aborted = 0
        self.stopped = 0
        self.resolved = None
        FakeRun.made.append(self)

    async def start(self) -> None:
        self.progress(ROLLOUT_LINE)
        self.started.set()

    async def wait_ready(self, timeout: float, serving=None) -> None:
        await self.serving.wait()
        if serving is not None:
            serving()
        await self.routed.wait()

    def is_ready(self) -> bool:
        return self.serving.is_set()

    def describe(self) -> dict:
        return {"service": "cart", "destination": "127.0.0.1:8080", "match": None}

    async def stop(self) -> None:
        self.stopped += 1

    def abort(self) -> None:
        self.aborted += 1


@pytest.fixture
def fake_run(monkeypatch):
    FakeRun.made = []
    monkeypatch.setattr(intercept_unit_mod, "InterceptRun", FakeRun)

    async def never_deleted(self) -> None:  # the workload watch needs a cluster; it stays
        await asyncio.Event().wait()

    monkeypatch.setattr(InterceptUnit, "_until_deleted", never_deleted)
    return FakeRun


def spec() -> InterceptSpec:
    ic = Intercept.model_validate({"name": "cart", "workload": "cart", "port": "8080:http"})
    return InterceptSpec(kube=None, intercept=ic, namespace="shop", session_id="s1", settings=Settings())


async def until(predicate, what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(0.01)  # a fake's state has no event of its own to wait for
    assert predicate(), what


async def test_the_note_follows_the_state_not_the_last_progress_line(fake_run):
    # -- stage 1: the run reports the rollout: that is the note while it lasts ------------------
    notes: list[tuple[str, str | None]] = []
    unit = spec().create(lambda ev: notes.append((unit.health().state.value, unit.health().detail)))
    await unit.start()
    await until(lambda: fake_run.made and fake_run.made[0].started.is_set(), "the run started")
    assert ("pending", ROLLOUT_LINE) in notes
    # -- stage 2: the rollout is over: the note says what is pending now, not "Waiting for" -----
    st = unit.health()
    assert st.state is State.PENDING and st.detail.startswith("connecting"), st
    # -- stage 3: serving: ready, and no note left over --------------------------------------------
    fake_run.made[0].serving.set()
    await until(lambda: unit.health().state is State.READY, "ready")
    assert unit.health().detail is None
    await unit.stop()
    assert fake_run.made[0].stopped == 1


async def test_the_second_ctrl_c_reaches_the_runs_abort(fake_run):
    # -- stage 1: a reconciler running the intercept unit, its run serving -------------------------
    s = spec()
    rec = Reconciler(lambda: {s.key: s}, debounce=0.01)
    async with rec:
        await until(lambda: fake_run.made, "the run was made")
        fake_run.made[0].serving.set()
        assert await rec.wait_until(lambda r: s.key in r.running and r.running[s.key].health().state is State.READY,
                                    WAIT)
        # -- stage 2: the second Ctrl-C: the run's abort (sshfs killed, lazy unmount) is called --
        rec.abort()
        assert fake_run.made[0].aborted == 1


async def test_the_handler_may_start_before_the_route_probe_ends(fake_run):
    events: list[tuple[str, str | None, str]] = []
    sp = spec()
    unit = sp.create(lambda ev: events.append((ev.kind, ev.detail, unit.health().state.value)))
    await unit.start()
    await until(lambda: fake_run.made and fake_run.made[0].started.is_set(), "the run started")
    run = fake_run.made[0]
    run.routed.clear()
    assert sp.key not in sp.runs
    run.serving.set()
    # Tunnels and env ready: the handler's gate opens (desired.py reads ready_hashes on the kube event)...
    await until(lambda: ("kube", "intercept serving", "pending") in events, "the serving event")
    assert sp.runs[sp.key] is run and sp.ready_hashes[sp.key] == sp.spec_hash
    # ...the state change first, so the reconciler runs its pass at once (a lone kube event is debounced)
    i = events.index(("kube", "intercept serving", "pending"))
    assert events[i - 1][0] == "unit_changed", events
    # ...but the intercept itself is not ready until the node routes to the agents.
    assert unit.health().state is State.PENDING
    run.routed.set()
    await until(lambda: unit.health().state is State.READY, "ready once routed")
    assert [e for e in events if e[0] == "kube"] == [("kube", "intercept serving", "pending")]
    await unit.stop()
    assert sp.key not in sp.runs
