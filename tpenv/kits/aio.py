"""Asyncio building blocks: named guarded tasks with a staged stop, and a retry backoff.

Modelled on kopf's ``_cogs/aiokits``: every background task has a name, and a guard that
logs how it ended, so no task dies silently and no exception is "never retrieved".

A task's body receives a ``stopping`` event. Stopping a task is staged:

1. set ``stopping`` (the polite request; the body should notice and return),
2. wait up to ``grace`` seconds,
3. cancel the task,
4. wait up to ``cancel_wait`` seconds more, and warn if it is still running.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

# Defaults mirror tpenv.settings' `handlers` section; callers pass the settings' values.
STOP_GRACE = 3.0
CANCEL_WAIT = 1.0


def unit_logger(kind: str, name: str) -> logging.LoggerAdapter:
    """The ``[kind/name]`` logger of one unit (tpenv.logs.unit_logger when it exists)."""
    try:  # the CLI developer's helper; fall back to an equivalent adapter until it lands
        from tpenv.logs import unit_logger as _unit_logger  # type: ignore[import-not-found]
    except ImportError:
        return _PrefixAdapter(logging.getLogger("tpenv." + kind), {"prefix": f"[{kind}/{name}]"})
    return _unit_logger(kind, name)


class _PrefixAdapter(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['prefix']} {msg}", kwargs


Body = Callable[[asyncio.Event], Awaitable[Any]]


class NamedTask:
    """One named background task with a guard and a staged stop.

    ``on_done(task)`` (optional) is called once, in the loop, when the body ended for any
    reason, which is how a unit reports "I ended/failed" into a reconciler's queue.
    ``close()`` and ``stop()`` are safe to call twice and from ``on_done``.
    """

    def __init__(
        self,
        kind: str,
        name: str,
        body: Body,
        *,
        logger: logging.LoggerAdapter | logging.Logger | None = None,
        on_done: Callable[[NamedTask], None] | None = None,
        stop_grace: float = STOP_GRACE,
        cancel_wait: float = CANCEL_WAIT,
    ) -> None:
        self.kind, self.name = kind, name
        self.logger = logger if logger is not None else unit_logger(kind, name)
        self.stopping = asyncio.Event()
        self.stop_grace, self.cancel_wait = stop_grace, cancel_wait
        self.error: BaseException | None = None
        self.result: Any = None
        self.cancelled = False
        self._on_done = on_done
        self._task = asyncio.create_task(self._guard(body), name=f"{kind}/{name}")

    def __repr__(self) -> str:
        return f"<NamedTask {self.kind}/{self.name} {'done' if self.done else 'running'}>"

    @property
    def done(self) -> bool:
        return self._task.done()

    async def _guard(self, body: Body) -> None:
        try:
            self.result = await body(self.stopping)
        except asyncio.CancelledError:
            self.cancelled = True
            self.logger.debug("task cancelled")
            raise
        except Exception as e:  # the guard's job: record and log, never lose it
            self.error = e
            self.logger.error("task failed: %s", e, exc_info=not _is_expected(e))
        else:
            self.logger.debug("task finished")
        finally:
            if self._on_done is not None:
                try:
                    self._on_done(self)
                except Exception:  # a broken callback must not hide the task's own outcome
                    self.logger.exception("on_done callback failed")

    async def wait(self) -> None:
        """Wait until the body ended (any way); never raises the body's error (see ``error``)."""
        await asyncio.wait({self._task})

    async def stop(self, grace: float | None = None) -> bool:
        """Staged stop; returns True if the task is over, False if it outlived the cancel."""
        if self._task.done():
            return True
        self.stopping.set()
        grace = self.stop_grace if grace is None else grace
        if grace > 0:
            await asyncio.wait({self._task}, timeout=grace)
        if not self._task.done():
            self.logger.debug("did not stop within %.1fs, cancelling", grace)
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=self.cancel_wait)
        if not self._task.done():
            self.logger.warning("still running %.1fs after cancel; leaving it", self.cancel_wait)
            return False
        return True

    def cancel(self) -> None:
        """Cancel without waiting (for synchronous callers: abort paths)."""
        self.stopping.set()
        self._task.cancel()

    close = stop

    async def wait_closed(self) -> None:
        await self.wait()

    async def __aenter__(self) -> NamedTask:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _is_expected(e: BaseException) -> bool:
    # tpenv's own errors carry a message meant for people; a traceback only adds noise.
    from tpenv.errors import TpenvError

    return isinstance(e, TpenvError)


async def stop_all(tasks: Iterable[NamedTask], grace: float | None = None) -> bool:
    """Stop several tasks concurrently; True if all are over."""
    tasks = list(tasks)
    if not tasks:
        return True
    results = await asyncio.gather(*(t.stop(grace) for t in tasks))
    return all(results)


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it is set."""
    if event.is_set():
        return True
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


class Backoff:
    """Exponential backoff with jitter, reset after a healthy period.

    Call ``started()`` when the thing (re)starts and ``failed()`` when it fails; ``failed()``
    returns the delay before the next attempt. If the thing ran for ``healthy_after``
    seconds before failing, the failure counts as the first one again.
    """

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        *,
        factor: float = 2.0,
        jitter: float = 0.2,
        healthy_after: float = 10.0,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("Backoff needs 0 < initial <= maximum, factor >= 1, 0 <= jitter < 1")
        self.initial, self.maximum, self.factor, self.jitter = initial, maximum, factor, jitter
        self.healthy_after = healthy_after
        self._rng, self._clock = rng, clock
        self.attempts = 0  # consecutive failures since the last reset
        self._started_at: float | None = None

    def started(self) -> None:
        self._started_at = self._clock()

    def reset(self) -> None:
        self.attempts = 0

    def failed(self) -> float:
        if self._started_at is not None and self._clock() - self._started_at >= self.healthy_after:
            self.attempts = 0
        self._started_at = None
        base = min(self.maximum, self.initial * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        # Jitter spreads retries of many units (and many developers) apart; never above maximum.
        delay = base * (1 + self.jitter * (2 * self._rng() - 1))
        return min(self.maximum, max(0.0, delay))


class DaemonExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor (``asyncio.to_thread``, ``run_in_executor``, the kube kit's
    API calls, DNS lookups): each call in a daemon thread that nothing joins. A call stuck in
    the kernel (a resolver that never answers, an API server gone mid-request) then cannot hold
    ``asyncio.run``'s teardown or the interpreter's exit, which join a ThreadPoolExecutor's
    workers (issue #19: Ctrl-C always works). A subclass only because asyncio requires one."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)  # never used: submit() starts its own threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                fut.set_exception(e)

        threading.Thread(target=run, name=f"tpenv-call/{getattr(fn, '__name__', 'fn')}", daemon=True).start()
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None  # nothing to join, by design
