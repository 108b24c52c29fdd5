"""The desired state of ``tpenv up``: every unit ``telepresence.yaml`` asks for.

``UpFactory`` is the unit factory ``tpenv.engine.up.run_up`` calls at every reconcile pass:

- ``("intercept", ns, workload, port)`` per intercept: an :class:`InterceptUnit` wrapping an
  :class:`~tpenv.engine.intercepts.InterceptRun` (agent injection, one tunnel per ready pod,
  env and mount), which keeps itself current across pod restarts with its own inner loop;
- ``("forward", ns, service, port)`` per forward (forwards.py);
- ``("handler", name)`` per intercept with ``run:``, depending on its intercept, started with
  that intercept's env as it is at each (re)start.

The Kube connection is opened on the first pass that needs one and lives for the session.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpenv.config.models import Config, Intercept
from tpenv.engine.forwards import forward_specs
from tpenv.engine.intercepts import InterceptRun, intercept_key
from tpenv.engine.units import Key, Notify, State, TaskUnit, UnitSpec, hash_spec
from tpenv.engine.up import UpContext, handler_specs
from tpenv.kits.kube import Kube


@dataclass(frozen=True)
class InterceptSpec:
    kube: Kube = field(compare=False, repr=False)
    intercept: Intercept = field(compare=False)
    namespace: str
    session_id: str
    settings: Any = field(compare=False, repr=False)
    base_dir: Path = Path(".")
    runs: dict = field(default_factory=dict, compare=False, repr=False)  # key -> InterceptRun, shared

    @property
    def key(self) -> Key:
        return intercept_key(self.namespace, self.intercept.workload_name, self.intercept.port)

    @property
    def spec_hash(self) -> str:
        # The handler's run: block is the handler unit's business: editing it must not
        # re-register the intercept.
        return hash_spec(self.namespace, self.intercept.model_dump(mode="json", exclude={"run"}), str(self.base_dir))

    @property
    def depends_on(self) -> frozenset[Key]:
        return frozenset()

    def create(self, notify: Notify) -> "InterceptUnit":
        return InterceptUnit(self, notify)


class InterceptUnit(TaskUnit):
    """One intercept of ``up``: ready once every ready replica's agent routes to us and the env
    (and mount) are in place. Pod restarts are healed inside the InterceptRun."""

    def __init__(self, spec: InterceptSpec, notify: Notify) -> None:
        super().__init__(spec.key, spec.spec_hash, notify,
                         stop_grace=spec.settings.handlers.stop_grace + 5.0 if spec.settings else 8.0)
        self.spec = spec
        self.irun: InterceptRun | None = None

    async def run(self, stopping: asyncio.Event, ready: Callable[[], None]) -> None:
        s = self.spec
        self.irun = InterceptRun(s.kube, s.intercept, s.namespace, s.session_id, s.settings,
                                 progress=lambda line: self.log.info("%s", line), base_dir=s.base_dir)
        try:
            await self.irun.start()
            timeout = s.settings.kube.rollout_timeout if s.settings else 120.0
            await self.irun.wait_ready(timeout)
            s.runs[self.key] = self.irun
            d = self.irun.describe()
            self.log.info("intercepting %s -> %s (%s)", d["service"], d["destination"],
                          "HTTP " + str(d["match"]) if d["match"] else "all TCP")
            ready()
            await stopping.wait()
        finally:
            if s.runs.get(self.key) is self.irun:
                del s.runs[self.key]
            await self.irun.stop()

    def health(self):
        # Show the inner loop's truth: a replica being replaced makes the intercept "starting".
        st = super().health()
        if st.state is State.READY and self.irun is not None and not self.irun.is_ready():
            st.detail = "waiting for a ready replica"
        elif st.state is State.READY:
            st.detail = None
        return st

    def env(self) -> dict[str, str]:
        unit = self.irun.env_unit() if self.irun else None
        return dict(unit.env) if unit else {}


class UpFactory:
    """``factory(config, uctx)`` for run_up: intercepts, forwards and handlers."""

    def __init__(self, settings: Any, *, kube_context: str | None = None, kubeconfig: str | None = None,
                 namespace_override: str | None = None) -> None:
        self.settings = settings
        self.kube_context = kube_context
        self.kubeconfig = kubeconfig
        self.namespace_override = namespace_override
        self.kube: Kube | None = None
        self.runs: dict[Key, InterceptRun] = {}

    async def _kube(self, config: Config, uctx: UpContext) -> Kube:
        if self.kube is None:
            self.kube = await Kube.load(self.kubeconfig, self.kube_context or config.context)
            await uctx.resources.enter_async_context(self.kube)
        return self.kube

    def _env_for(self, key: Key) -> Callable[[], dict[str, str]]:
        def env() -> dict[str, str]:
            run = self.runs.get(key)
            unit = run.env_unit() if run else None
            return dict(unit.env) if unit else {}
        return env

    async def __call__(self, config: Config, uctx: UpContext) -> dict[Key, UnitSpec]:
        specs: dict[Key, UnitSpec] = {}
        wanted = [ic for ic in config.intercepts if uctx.wanted(ic.name)]
        fwd_wanted = [fw for fw in config.forwards if uctx.wanted(fw.service)]
        if not wanted and not fwd_wanted:
            return dict(handler_specs(config, uctx))
        kube = await self._kube(config, uctx)
        base_dir = config.source.parent if config.source else Path.cwd()
        keys: dict[str, Key] = {}
        for ic in wanted:
            ns = self.namespace_override or ic.namespace or config.namespace or kube.namespace
            spec = InterceptSpec(kube, ic, ns, uctx.session_id, self.settings, base_dir, self.runs)
            specs[spec.key] = spec
            keys[ic.name] = spec.key
        t = self.settings.tunnels if self.settings else None
        specs.update(forward_specs(config, kube, uctx.wanted, connect_timeout=t.connect_timeout if t else 10.0))
        specs.update(handler_specs(config, uctx, env_for=lambda ic: self._env_for(keys[ic.name]),
                                   depends_on=lambda ic: frozenset({keys[ic.name]})))
        return specs
