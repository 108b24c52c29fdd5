"""The intercept unit of ``tpenv up``: one :class:`InterceptUnit` per intercept in ``telepresence.yaml``.

It wraps an :class:`~tpenv.engine.intercepts.InterceptRun` (agent injection, one tunnel per ready
pod, env and mount), which keeps itself current across pod restarts with its own inner loop.
``start()`` returns at once: injection rollouts and a workload that does not exist yet (waited for
with a watch) never hold the session's other units. desired.py's ``UpFactory`` makes the specs.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpenv.config.models import Intercept
from tpenv.engine.intercepts import InterceptRun, intercept_key
from tpenv.engine.units import Key, Notify, State, TaskUnit, UnitEvent, hash_spec
from tpenv.errors import NotFound, TransientError
from tpenv.kits.aio import Backoff
from tpenv.kits.kube import Kube, What, parse_workload_ref
from tpenv.settings import Settings

@dataclass(frozen=True)
class InterceptSpec:
    kube: Kube = field(compare=False, repr=False)
    intercept: Intercept = field(compare=False)
    namespace: str
    session_id: str
    settings: Settings = field(compare=False, repr=False)
    base_dir: Path = Path(".")
    runs: dict = field(default_factory=dict, compare=False, repr=False)  # key -> ready InterceptRun, shared
    ready_hashes: dict = field(default_factory=dict, compare=False, repr=False)  # key -> spec_hash of that run
    context: str | None = None  # the contexts: entry (None: the file's one unnamed context)

    @property
    def key(self) -> Key:
        return intercept_key(self.namespace, self.intercept.workload_name, self.intercept.port, self.context)

    @property
    def spec_hash(self) -> str:
        # The handler's run: block is the handler unit's business: editing it must not
        # re-register the intercept. An entry that now finds another kube context restarts it.
        return hash_spec(self.namespace, self.intercept.model_dump(mode="json", exclude={"run"}), str(self.base_dir),
                         self.kube.context if self.context else None)

    @property
    def depends_on(self) -> frozenset[Key]:
        return frozenset()

    def create(self, notify: Notify) -> "InterceptUnit":
        return InterceptUnit(self, notify)


class InterceptUnit(TaskUnit):
    """One intercept of ``up``: ready once every ready replica's agent routes to us and the env
    (and mount) are in place. Pod restarts are healed inside the InterceptRun.

    ``start()`` returns at once (state ``pending`` with what it is doing as the detail), so a
    rollout or a missing workload never holds the session's other units. A workload, namespace
    or Service that does not exist yet is waited for with a watch, said once; once the intercept
    serves, the unit sends a ``kube`` event so the next pass adds its handler (handlers start
    with the intercept's env, so only once the intercept is ready)."""

    def __init__(self, spec: InterceptSpec, notify: Notify) -> None:
        super().__init__(spec.key, spec.spec_hash, notify,
                         stop_grace=spec.settings.handlers.stop_grace + 5.0)
        self.spec = spec
        self.irun: InterceptRun | None = None

    def _progress(self, line: str) -> None:
        self.log.info("%s", line)
        if self.state.state is State.PENDING:
            self.set_state(State.PENDING, detail=line)

    async def run(self, stopping: asyncio.Event, ready: Callable[[], None]) -> None:
        s = self.spec
        self.set_state(State.PENDING, detail=f"resolving {s.intercept.workload} in {s.namespace}")
        ready()  # start() returns now: the rest is progress, shown in the status
        said: str | None = None
        try:
            while True:
                self.irun = InterceptRun(s.kube, s.intercept, s.namespace, s.session_id, s.settings,
                                         progress=self._progress, base_dir=s.base_dir)
                try:
                    await self.irun.start()
                    break
                except NotFound as e:
                    await self.irun.stop()
                    waiting, change = await self._missing(e)
                    if waiting != said:  # once per cause, not at every retry
                        self.log.info("%s", waiting)
                        said = waiting
                    self.set_state(State.PENDING, detail=waiting)
                    if not await _first_of(change, stopping.wait()):
                        return
            timeout = s.settings.kube.rollout_timeout
            # The last progress line ("Waiting for ... pods ready") is over: say what is pending now.
            self.set_state(State.PENDING, detail="connecting to the agents, reading the env and mounting the volumes")
            await self.irun.wait_ready(timeout, serving=self._serving)
            self._serving()
            d = self.irun.describe()
            self.log.info("intercepting %s -> %s (%s)", d["service"], d["destination"],
                          "HTTP " + str(d["match"]) if d["match"] else "all TCP")
            self.set_state(State.READY)
            if await _first_of(self._until_deleted(), stopping.wait()):
                # Deleted (e.g. a redeploy: delete, then apply): start over, which waits for it
                # to exist again and injects the agent into the new one.
                raise TransientError(f"{self.irun.resolved.workload.ref} was deleted; waiting for it to come back")
        finally:
            if s.runs.get(self.key) is self.irun:
                del s.runs[self.key]
                s.ready_hashes.pop(self.key, None)
            if self.irun is not None:
                await self.irun.stop()

    def _serving(self) -> None:
        """Tunnels and env ready: the handler may start (its env is there), once. The unit itself
        is READY only once the node routes to the agents (the route probe after our rollout):
        starting the handler meanwhile overlaps its start with kube-proxy's sync."""
        s = self.spec
        if s.runs.get(self.key) is self.irun:
            return
        s.runs[self.key] = self.irun
        s.ready_hashes[self.key] = s.spec_hash
        # The state change first: the loop runs a pass at once for it and takes the kube event
        # (its handler may start) along; a kube event alone waits out the debounce of a burst.
        self.set_state(State.PENDING, detail="serving; checking that the node routes to the agents")
        self.notify(UnitEvent("kube", self.key, detail="intercept serving"))

    async def _until_deleted(self) -> None:
        """Return when the intercepted workload is deleted. Outlives API server outages: a failed
        watch is opened again (with backoff) after a list, which also tells whether it is gone."""
        assert self.irun is not None and self.irun.resolved is not None
        s, kube, w = self.spec, self.spec.kube, self.irun.resolved.workload
        lister = getattr(kube.apps, _WORKLOAD_LISTERS[w.kind])
        what = What("watch", _PLURAL_OF[w.kind], w.namespace)
        t = s.settings.tunnels
        backoff = Backoff(t.retry_initial, t.retry_max)
        kw = {"field_selector": f"metadata.name={w.name}"}
        while True:
            try:
                data = await kube.call(lister, w.namespace, what=what, **kw) or {}
                if not data.get("items"):
                    return
                backoff.started()
                async with kube.watch(lister, w.namespace, resource_version=(data.get("metadata") or {})
                                      .get("resourceVersion"), what=what, **kw) as events:
                    async for kind, _obj in events:
                        if kind == "DELETED":
                            return
            except Exception as e:  # noqa: BLE001 - retried; cancellation is not an Exception
                delay = backoff.failed()
                self.log.debug("watch of %s: %s (again in %.1fs)", w.ref, e, delay)
                await asyncio.sleep(delay)

    async def _missing(self, error: NotFound) -> tuple[str, Awaitable[None]]:
        """What is missing (the workload, else a Service or port of it) and a coroutine that
        returns on the next change that may fix it (a watch from now on, not a poll)."""
        s, kube = self.spec, self.spec.kube
        ic = s.intercept
        kind = parse_workload_ref(ic.workload)[0]
        kinds = [kind] if kind else list(_WORKLOAD_LISTERS)
        try:
            await kube.get_workload(ic.workload, s.namespace)
        except NotFound:
            what = ic.workload if kind else f"workload {ic.workload} ({', '.join(k.lower() for k in kinds)})"
            waits = [_appears(kube, getattr(kube.apps, _WORKLOAD_LISTERS[k]), s.namespace, _PLURAL_OF[k],
                              name=ic.workload_name) for k in kinds]
            return f"waiting for {what} to exist in namespace {s.namespace}", _first_done(waits)
        # The workload is there: a Service (or its port) is not. Any Service or workload change may fix it.
        waits = [_appears(kube, kube.core.list_namespaced_service, s.namespace, "services")]
        waits += [_appears(kube, getattr(kube.apps, _WORKLOAD_LISTERS[k]), s.namespace, _PLURAL_OF[k],
                           name=ic.workload_name, changed=True) for k in kinds]
        return f"waiting: {error}", _first_done(waits)

    def abort(self) -> None:
        """Second Ctrl-C: the run's own units first (sshfs killed, the mount detached lazily,
        tunnels dropped), synchronously; cancelling the task alone would leave them to stops
        that the forced exit never runs (docs/reconciler.md, "Stopping")."""
        try:
            if self.irun is not None:
                self.irun.abort()
        finally:
            super().abort()

    def health(self):
        # Show the inner loop's truth: a replica being replaced makes the intercept "starting".
        st = super().health()
        if st.state is State.READY and self.irun is not None and not self.irun.is_ready():
            st.detail = "waiting for a ready replica"
        elif st.state is State.READY:
            st.detail = None
        return st


_WORKLOAD_LISTERS = {"Deployment": "list_namespaced_deployment", "StatefulSet": "list_namespaced_stateful_set",
                     "ReplicaSet": "list_namespaced_replica_set"}
_PLURAL_OF = {"Deployment": "deployments", "StatefulSet": "statefulsets", "ReplicaSet": "replicasets"}


async def _appears(kube: Kube, lister: Callable[..., Any], namespace: str, plural: str, *,
                   name: str | None = None, changed: bool = False) -> None:
    """Return once an object of ``lister`` (named ``name`` if given) exists (unless ``changed``)
    or changes after now. A list gives the resourceVersion the watch starts from, so objects that
    were there before are not mistaken for news."""
    kw = {"field_selector": f"metadata.name={name}"} if name else {}
    data = await kube.call(lister, namespace, what=What("list", plural, namespace), **kw)
    if name and (data or {}).get("items") and not changed:
        return
    rv = ((data or {}).get("metadata") or {}).get("resourceVersion")
    async with kube.watch(lister, namespace, resource_version=rv, what=What("watch", plural, namespace),
                          **kw) as events:
        async for _kind, _obj in events:
            return
    raise TransientError(f"the watch of {plural} in {namespace} ended")


async def _first_done(aws: list[Awaitable[None]]) -> None:
    """The first of several waits to end (its error raised); the others cancelled."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _first_of(change: Awaitable[None], stopped: Awaitable[Any]) -> bool:
    """Wait for ``change`` or a stop; True when ``change`` came first (its error raised)."""
    c, st = asyncio.ensure_future(change), asyncio.ensure_future(stopped)
    try:
        await asyncio.wait({c, st}, return_when=asyncio.FIRST_COMPLETED)
        if st.done():
            return False
        c.result()
        return True
    finally:
        for t in (c, st):
            t.cancel()
        await asyncio.gather(c, st, return_exceptions=True)
