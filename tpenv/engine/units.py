"""The contract between the reconciler and every kind of unit it keeps alive.

A *spec* is the desired description of one unit (cheap, immutable, built from the config
and the cluster's state at every reconcile pass); a *unit* is the running thing the
reconciler created from a spec. Both carry the same three facts the diff step needs:

- ``key``: what it is, e.g. ``("intercept", ns, workload, port)``, ``("tunnel", ns, pod)``,
  ``("handler", name)``, ``("forward", name)``; the first element is the kind;
- ``spec_hash``: changes exactly when the spec changes (changed -> restarted, same -> kept);
- ``depends_on``: keys that must run before this one starts, and that restart it.

A unit reports what happens to it on its own through the ``notify`` callable it is given at
creation (see :class:`UnitEvent`): ``unit_failed`` asks the reconciler to restart it (and
its dependents) with backoff; ``unit_changed`` just refreshes status. Units that heal
themselves (a handler restarting its process) only report state changes.

:class:`TaskUnit` is a base for the common case: a unit whose work is one long-running
coroutine (a tunnel, a forward) that says when it is ready and fails by raising.
"""
from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tpenv.errors import TransientError
from tpenv.kits.aio import NamedTask, unit_logger

Key = tuple[Any, ...]


class State(str, enum.Enum):
    PENDING = "pending"  # wanted, not started: waiting for a dependency or a retry
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"  # ended with an error; a retry may be scheduled
    STOPPING = "stopping"
    STOPPED = "stopped"  # ended on purpose (or a handler with restart: never that exited)


@dataclass
class UnitState:
    """What ``tpenv status`` shows for one unit."""

    state: State = State.PENDING
    since: float = field(default_factory=time.time)  # wall clock: shown to people
    last_error: str | None = None
    restarts: int = 0
    detail: str | None = None  # e.g. "waiting for ('tunnel', 'ns', 'pod')", "retry in 2.0s"

    def set(self, state: State, *, error: str | None = None, detail: str | None = None) -> None:
        if state is not self.state:
            self.state, self.since = state, time.time()
        if error is not None:
            self.last_error = error
        self.detail = detail


@dataclass(frozen=True)
class UnitEvent:
    """One thing that happened, queued for the reconciler.

    ``kind``: "config" (file saved), "kube" (a watch event), "unit_failed", "unit_changed",
    "file_changed", "retry" (internal), "stop" (down requested).
    """

    kind: str
    key: Key | None = None
    error: str | None = None
    detail: Any = None
    # The unit instance that sent it (set by the reconciler's notify): a late event from a
    # unit already replaced must not restart its successor.
    source: Any = field(default=None, compare=False, repr=False)
    # unit_failed: the exception itself when there is one, so the retry follows its type
    # (permanent or transient, retry_after) and rec.errors keeps its kind and hint.
    exc: Exception | None = field(default=None, compare=False)


Notify = Callable[[UnitEvent], None]


@runtime_checkable
class Unit(Protocol):
    """A running unit. ``start()`` returns once started (or raises: the reconciler retries
    with backoff; a ``PermanentError`` is also retried on the next config/kube event).
    ``stop()`` must be safe twice and after a failure. ``abort()`` is the second Ctrl-C:
    synchronous, best effort, quick (e.g. SIGKILL a process group)."""

    key: Key
    spec_hash: str
    depends_on: frozenset[Key]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def health(self) -> UnitState: ...

    def abort(self) -> None: ...


@runtime_checkable
class UnitSpec(Protocol):
    """A desired unit; ``create(notify)`` makes the (not yet started) unit."""

    key: Key
    spec_hash: str
    depends_on: frozenset[Key]

    def create(self, notify: Notify) -> Unit: ...


def hash_spec(*parts: Any) -> str:
    """A stable spec_hash of JSON-able parts (pydantic models: pass ``model_dump(mode="json")``)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def key_text(key: Key) -> str:
    """``("intercept", "ns", "web", 8080)`` -> ``intercept/ns/web/8080`` for logs and status."""
    return "/".join(str(k) for k in key)



class TaskUnit:
    """A base for units whose work is one long-running coroutine (a tunnel, a forward, an
    intercept's keep-alive). Subclass and implement ``run(stopping, ready)``:

    - call ``ready()`` once the unit serves: ``start()`` returns then;
    - return when ``stopping`` is set (``stop()`` cancels after ``stop_grace`` otherwise);
    - raise to fail: before ``ready()`` it fails ``start()``; after it, the reconciler gets
      ``unit_failed`` and restarts the unit (and its dependents) with backoff. Ending without
      an error while not asked to stop also counts as a failure: units are meant to run.

    Logs go through ``self.log`` (``[kind/rest-of-key]``); ``set_state()`` updates status.
    """

    def __init__(self, key: Key, spec_hash: str, notify: Notify, *, depends_on: frozenset[Key] = frozenset(),
                 stop_grace: float = 3.0) -> None:
        self.key, self.spec_hash, self.depends_on = key, spec_hash, frozenset(depends_on)
        self.notify, self.stop_grace = notify, stop_grace
        self.kind, self.name = str(key[0]), key_text(key[1:]) or str(key[0])
        self.log = unit_logger(self.kind, self.name)
        self.state = UnitState()
        self._task: NamedTask | None = None
        self._ready = asyncio.Event()
        self._stop_requested = False

    async def run(self, stopping: asyncio.Event, ready: Callable[[], None]) -> None:
        raise NotImplementedError(f"{type(self).__name__}.run")

    def set_state(self, state: State, *, error: str | None = None, detail: str | None = None) -> None:
        """Change what status shows, and tell the loop (status only, no restart)."""
        self.state.set(state, error=error, detail=detail)
        self.notify(UnitEvent("unit_changed", self.key, detail=state.value))

    async def start(self) -> None:
        self.set_state(State.STARTING)
        self._task = NamedTask(self.kind, self.name, lambda stopping: self.run(stopping, self._ready.set),
                               logger=self.log, on_done=self._ended, stop_grace=self.stop_grace)
        waits = {asyncio.ensure_future(self._ready.wait()), asyncio.ensure_future(self._task.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not self._ready.is_set():
            if self._task.error is not None:
                raise self._task.error
            raise TransientError(f"{key_text(self.key)} ended before it was ready")
        if self.state.state is State.STARTING:
            self.set_state(State.READY)

    def _ended(self, task: NamedTask) -> None:
        if self._stop_requested or not self._ready.is_set():
            return  # asked to stop, or start() reports the failure itself
        error = str(task.error) if task.error is not None else "ended unexpectedly"
        self.state.set(State.FAILED, error=error)
        exc = task.error if isinstance(task.error, Exception) else None
        self.notify(UnitEvent("unit_failed", self.key, error=error, exc=exc))

    async def stop(self) -> None:
        self._stop_requested = True
        if self._task is not None and not self._task.done:
            self.set_state(State.STOPPING)
            await self._task.stop()
        self.state.set(State.STOPPED)

    def abort(self) -> None:
        self._stop_requested = True
        if self._task is not None:
            self._task.cancel()

    def health(self) -> UnitState:
        return self.state
