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
"""
from __future__ import annotations

import enum
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

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
