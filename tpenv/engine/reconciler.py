"""The reconciler's loop (:class:`Reconciler`); its diff step, :func:`plan`, is plan.py.

The loop waits for events (config saved, kube watch events, a unit failed, a file changed,
a retry due), coalesces a burst of them (debounce), asks a provided function for the
desired units, diffs them against the running ones, stops what must stop (dependents
first), starts what is missing (dependencies first, independent units concurrently), and
schedules retries of failed units with backoff. ``snapshot()`` is what ``tpenv status`` shows.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from tpenv.errors import PermanentError, TpenvError, TransientError
from tpenv.kits.aio import Backoff, unit_logger
from tpenv.engine.plan import plan
from tpenv.engine.units import Key, State, Unit, UnitEvent, UnitSpec, UnitState, key_text

# --- the loop -----------------------------------------------------------------------------

DesiredFn = Callable[[], "Mapping[Key, UnitSpec] | Awaitable[Mapping[Key, UnitSpec]]"]
TRIGGERS = frozenset({"config", "kube", "unit_failed", "file_changed", "retry"})


class Reconciler:
    """Keeps the running units equal to ``desired()``, until ``request_stop()``.

    ``desired`` is called at every pass (sync or async) and returns ``{key: spec}``; if it
    raises a ``TpenvError`` (an invalid config edit) the error is logged, shown in
    ``snapshot()`` and the running state is kept. Use as ``async with Reconciler(...) as r``
    or call ``run()`` yourself. Unit ``start()`` must return promptly: a unit that waits for
    something (a workload to appear) returns and reports progress through ``notify``.
    """

    def __init__(
        self,
        desired: DesiredFn,
        *,
        debounce: float = 0.2,
        restart_initial: float = 0.5,
        restart_max: float = 30.0,
        healthy_after: float = 10.0,
        stop_timeout: float = 15.0,
        name: str = "up",
    ) -> None:
        self._desired_fn = desired
        self.debounce, self.stop_timeout = debounce, stop_timeout
        self._backoff_args = dict(initial=restart_initial, maximum=restart_max, healthy_after=healthy_after)
        self.log = unit_logger("reconciler", name)
        self.queue: asyncio.Queue[UnitEvent] = asyncio.Queue()
        self.running: dict[Key, Unit] = {}
        self.specs: dict[Key, UnitSpec] = {}  # the last valid desired set
        self.config_error: str | None = None
        self.passes = 0
        self._status: dict[Key, UnitState] = {}  # units not running: pending / failed
        self._backoff: dict[Key, Backoff] = {}
        self._retry_at: dict[Key, float] = {}  # loop time of the next attempt
        self._permanent: set[Key] = set()  # last failure was permanent: retry on the next outside event
        # Each unit's last failure as raised (its kind and hint intact); the status keeps its text.
        self.errors: dict[Key, Exception] = {}
        self._restart: set[Key] = set()
        self._restarts: dict[Key, int] = {}
        self._started_once: set[Key] = set()
        self._stop_requested = False
        self._aborted = False
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._pass_task: asyncio.Task | None = None
        self.stopped = asyncio.Event()

    # -- events in ----------------------------------------------------------------------

    def notify(self, event: UnitEvent) -> None:
        """Queue an event (from the loop's thread)."""
        self.queue.put_nowait(event)

    def notify_threadsafe(self, event: UnitEvent, loop: asyncio.AbstractEventLoop) -> None:
        """Queue an event from another thread (e.g. a blocking kube watch)."""
        loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def _notify_for(self, key: Key) -> Callable[[UnitEvent], None]:
        box: list[Unit] = []

        def notify(event: UnitEvent) -> None:
            self.queue.put_nowait(UnitEvent(event.kind, event.key or key, event.error, event.detail,
                                            source=box[0] if box else None, exc=event.exc))

        notify.box = box  # type: ignore[attr-defined]  # filled once the unit exists
        return notify

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    def request_stop(self) -> None:
        """Graceful stop: the loop stops every unit (dependents first) and returns."""
        if not self._stop_requested:
            self.log.info("stopping every unit")
        self._stop_requested = True
        self.queue.put_nowait(UnitEvent("stop"))
        if self._pass_task is not None and not self._pass_task.done():
            self._pass_task.cancel()  # a long start must not delay the stop

    def abort(self) -> None:
        """Second Ctrl-C: best-effort, synchronous teardown of everything still running; the
        loop then ends without the graceful stops (cluster-side, the agents' leases expire)."""
        self._aborted = True
        self._stop_requested = True
        self.queue.put_nowait(UnitEvent("stop"))
        if self._pass_task is not None and not self._pass_task.done():
            self._pass_task.cancel()
        for key, unit in list(self.running.items()):
            try:
                unit.abort()
            except Exception as e:  # keep aborting the others
                self.log.warning("abort of %s failed: %s", key_text(key), e)

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        self.queue.put_nowait(UnitEvent("config", detail="initial"))
        first = True
        try:
            while not self._stop_requested:
                events = await self._gather(debounce=not first)
                first = False
                if self._stop_requested:
                    break
                if not any(e.kind in TRIGGERS for e in events):
                    await self._tick()
                    continue
                self._pass_task = asyncio.create_task(self._pass(events), name="reconciler/pass")
                try:
                    await asyncio.shield(self._pass_task)
                except asyncio.CancelledError:
                    if not self._stop_requested:
                        self._pass_task.cancel()
                        raise
                except Exception:
                    self.log.exception("reconcile pass failed; the next event retries")
                await self._tick()
        finally:
            await self._stop_everything()
            self.stopped.set()
            await self._tick()

    async def _gather(self, debounce: bool) -> list[UnitEvent]:
        loop = asyncio.get_running_loop()
        timeout = max(0.0, min(self._retry_at.values()) - loop.time()) if self._retry_at else None
        try:
            first = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return [UnitEvent("retry")]
        events = [first]
        if not debounce or first.kind not in TRIGGERS:
            events.extend(self._drain())
            return events
        # Coalesce a burst (an editor saving several files, a rollout's pod events): wait until
        # `debounce` seconds pass quietly, but never longer than a few debounces in all.
        deadline = loop.time() + 5 * self.debounce
        while not any(e.kind == "stop" for e in events):
            left = min(self.debounce, deadline - loop.time())
            if left <= 0:
                break
            try:
                events.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        events.extend(self._drain())
        return events

    def _drain(self) -> list[UnitEvent]:
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out

    async def _tick(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, predicate: Callable[[Reconciler], bool], timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until ``predicate(self)`` holds after a pass or a unit event."""
        async def waiter() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self))

        try:
            await asyncio.wait_for(waiter(), timeout)
        except TimeoutError:
            return predicate(self)
        return True

    # -- one pass -----------------------------------------------------------------------

    async def _pass(self, events: list[UnitEvent]) -> None:
        loop = asyncio.get_running_loop()
        self.passes += 1
        outside = any(e.kind in ("config", "kube") for e in events)
        for e in events:
            if e.kind == "unit_failed" and e.key in self.running and self.running[e.key] is e.source:
                self._failed(e.key, e.exc if e.exc is not None else (e.error or "failed"))
                self._restart.add(e.key)
        if outside:  # the world changed: a permanent failure may be fixed now
            for k in self._permanent:
                self._retry_at.pop(k, None)
            self._permanent.clear()

        try:
            desired = await self._call_desired()
            p = plan(desired, self.running, self._restart)
        except TpenvError as e:
            # An invalid edit: say so, keep what runs. Failed units still restart (old specs).
            if outside:
                self.log.error("config not applied, keeping the running state:\n%s", e)
            self.config_error = str(e)
            desired = self.specs
            p = plan(desired, self.running, self._restart)
        else:
            if self.config_error is not None and outside:
                self.log.info("config valid again")
            self.config_error = None
        self.specs = dict(desired)
        self._restart.clear()

        if not p.empty:
            self.log.debug("plan: stop %s, start %s", [key_text(k) for k in p.stop], [key_text(k) for k in p.start])
        for wave in p.stop_waves:
            await asyncio.gather(*(self._stop_unit(k, p.why.get(k, "")) for k in wave))
        for k in list(self._status):
            if k not in desired:  # forgotten: no status, no retry
                for d in (self._status, self._backoff, self._retry_at, self._restarts):
                    d.pop(k, None)
                self._started_once.discard(k)
        for wave in p.start_waves:
            await asyncio.gather(*(self._start_unit(k, loop.time()) for k in wave))

    async def _call_desired(self) -> Mapping[Key, UnitSpec]:
        result = self._desired_fn()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        return result

    def _failed(self, key: Key, exc: Exception | str) -> None:
        """``exc``: what start raised or a running unit reported; only a text (an untyped report)
        or a foreign exception counts as transient without saying so.

        The type decides: a PermanentError is retried on the next outside change (and, slowly,
        by the backoff); a TransientError no sooner than its ``retry_after`` (a rollout's pace,
        a 409's quick redo), the backoff's curve when that is longer."""
        if isinstance(exc, Exception):
            self.errors[key] = exc
        else:
            self.errors.pop(key, None)
        error, permanent = str(exc), isinstance(exc, PermanentError)
        backoff = self._backoff.setdefault(key, Backoff(**self._backoff_args))
        delay = backoff.failed()
        if isinstance(exc, TransientError):
            delay = max(delay, exc.retry_after)
        self._retry_at[key] = asyncio.get_running_loop().time() + delay
        (self._permanent.add if permanent else self._permanent.discard)(key)
        st = self._status.setdefault(key, UnitState())
        st.set(State.FAILED, error=error, detail=f"retry in {delay:.1f}s" + (" or on the next change" if permanent else ""))
        # The log line is all `tpenv up` shows of a unit's failure: what to do goes with it (e.g.
        # connect without a manager: "install it with `tpenv manager install`"). The status keeps
        # the error's own text (verbs add the hint of rec.errors themselves).
        hint = getattr(exc, "hint", None)
        self.log.warning("%s failed: %s%s (retry in %.1fs)", key_text(key), error,
                         f"; {hint}" if hint and hint not in error else "", delay)

    async def _start_unit(self, key: Key, now: float) -> None:
        spec = self.specs[key]
        st = self._status.setdefault(key, UnitState())
        if self._retry_at.get(key, now) > now:
            return  # its retry is scheduled; the status already says when
        self._retry_at.pop(key, None)  # due: from now on only the dependencies can hold it
        waiting = sorted((key_text(d) for d in spec.depends_on if d not in self.running))
        if waiting:
            st.set(State.PENDING, detail="waiting for " + ", ".join(waiting))
            return
        notify = self._notify_for(key)
        try:
            unit = spec.create(notify)
        except Exception as e:
            self._failed(key, e)
            return
        notify.box.append(unit)  # type: ignore[attr-defined]
        if key in self._started_once:
            self._restarts[key] = self._restarts.get(key, 0) + 1
        self._started_once.add(key)
        self.running[key] = unit
        st.set(State.STARTING)
        self._backoff.setdefault(key, Backoff(**self._backoff_args)).started()
        await self._tick()  # status watchers see "starting" before a slow start ends
        try:
            await unit.start()
        except Exception as e:
            self.running.pop(key, None)
            await self._quiet_stop(key, unit)
            self._failed(key, e)
            return
        self.log.info("%s started", key_text(key))

    async def _stop_unit(self, key: Key, why: str) -> None:
        unit = self.running.get(key)
        if unit is None:
            return
        self.log.info("%s stopping (%s)", key_text(key), why or "stop")
        await self._quiet_stop(key, unit)
        self.running.pop(key, None)
        st = self._status.setdefault(key, UnitState())
        if st.state is not State.FAILED:
            st.set(State.STOPPED, detail=why or None)

    async def _quiet_stop(self, key: Key, unit: Unit) -> None:
        try:
            await asyncio.wait_for(unit.stop(), self.stop_timeout)
        except TimeoutError:
            self.log.warning("%s did not stop within %.0fs; leaving it", key_text(key), self.stop_timeout)
        except Exception as e:  # a unit failing to stop must not stop the others from stopping
            self.log.error("%s failed to stop: %s", key_text(key), e)

    async def _stop_everything(self) -> None:
        if self._aborted:
            self.running.clear()
            return
        p = plan({}, self.running)
        for wave in p.stop_waves:
            await asyncio.gather(*(self._stop_unit(k, "shutting down") for k in wave))
        self._retry_at.clear()

    # -- status -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Every unit (desired or still running): key, state, since, last error, restarts."""
        units = []
        for key in sorted(set(self.specs) | set(self.running), key=repr):
            if key in self.running:
                st = self.running[key].health()
            else:
                st = self._status.get(key) or UnitState()
            units.append({
                "key": list(key),
                "kind": str(key[0]),
                "name": key_text(key),
                "state": State(st.state).value,
                "since": st.since,
                "last_error": st.last_error or (self._status[key].last_error if key in self._status else None),
                "restarts": self._restarts.get(key, 0) + st.restarts,
                "detail": st.detail,
                # The cluster a unit talks to (a spec's optional ``context``: `contexts:` entries).
                "context": getattr(self.specs.get(key), "context", None),
            })
        return {"units": units, "config_error": self.config_error, "stopping": self._stop_requested}

    # -- as a resource ------------------------------------------------------------------

    async def __aenter__(self) -> Reconciler:
        self._task = asyncio.create_task(self.run(), name="reconciler/run")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Graceful stop; safe twice."""
        self.request_stop()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        if self._task is not None:
            await asyncio.wait({self._task})
        elif not self.stopped.is_set() and self._stop_requested:
            await self.stopped.wait()
