"""The desired state of ``tpenv up``: every unit ``telepresence.yaml`` asks for.

``UpFactory`` is the unit factory ``tpenv.engine.up.run_up`` calls at every reconcile pass:

- ``("intercept", ns, workload, port)`` per intercept: an :class:`InterceptUnit` (intercept_unit.py) wrapping an
  :class:`~tpenv.engine.intercepts.InterceptRun` (agent injection, one tunnel per ready pod,
  env and mount), which keeps itself current across pod restarts with its own inner loop;
- ``("forward", ns, service, port)`` per forward (forwards.py);
- ``("handler", name)`` per intercept with ``run:``, depending on its intercept, started with
  that intercept's env as it is at each (re)start; it is part of the desired set only once its
  intercept (as currently specified) serves, so it never starts with a half-made env.

An intercept unit's ``start()`` returns at once: injection rollouts and a workload that does not
exist yet (waited for with a watch) never hold the session's other units.

Every unit key ends with its context's name in a file with ``contexts:`` (contexts.py); the Kube
of each kubeconfig context is opened on the first pass that needs it and lives for the session.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tpenv.config.models import Config, Intercept
from tpenv.engine.contexts import Clusters, ContextDown, DownSpec, Targets, resolve_targets
from tpenv.engine.intercept_unit import InterceptSpec
from tpenv.engine.intercepts import InterceptRun
from tpenv.engine.localenv import command_env
from tpenv.engine.units import Key, UnitSpec
from tpenv.engine.up import UpContext, handler_specs
from tpenv.kits.kube import Kube
from tpenv.kits.kubeconfig import Kubeconfig
from tpenv.settings import Settings

class UpFactory:
    """``factory(config, uctx)`` for run_up: intercepts, forwards and handlers, each in its context
    (contexts.py): one Kube per kubeconfig context, opened on the first pass that needs it."""

    def __init__(self, settings: Settings, *, kube_context: str | None = None, kubeconfig: str | None = None,
                 namespace_override: str | None = None, only: Sequence[str] = (),
                 context_by: str = "--context") -> None:
        self.settings = settings
        self.kube_context = kube_context  # --context / TPENV_CONTEXT (context_by says which)
        self.context_by = context_by
        self.kubeconfig = kubeconfig
        self.namespace_override = namespace_override
        self.only = frozenset(only)
        self.clusters: Clusters | None = None
        self.runs: dict[Key, InterceptRun] = {}
        self.ready_hashes: dict[Key, str] = {}
        self._resolved: tuple[Config, Targets] | None = None
        self.contexts: dict[Key, str | None] = {}  # unit key -> its context's name, for status
        self.connection: Any = None  # the running ConnectUnit (outbound/unit.py), when connect: asks for one

    def status(self) -> dict[str, Any]:
        """Extra status of the session: its serving intercepts, marked as held by `tpenv up`
        (so `tpenv leave` can say why it will not end one, and `tpenv list` can name them)."""
        runs = list(self.runs.items())
        return {"intercepts": [dict(run.describe(), held_by="up", context=self.contexts.get(key)) for key, run in runs],
                "units": [dict(row, context=self.contexts.get(key)) for key, run in runs
                          if (row := run.mount_row()) is not None],
                **({"connection": self.connection.snapshot} if self.connection is not None else {})}

    def env_of(self, name: str) -> dict[str, str] | None:
        """The env of this session's intercept ``name`` (`tpenv env NAME`), once it is ready."""
        for run in list(self.runs.values()):
            env = run.env_of(name)
            if env is not None:
                return env
        return None

    def checked(self, config: Config) -> Config:
        """``config`` with its contexts resolved in the reader's kubeconfig (ConfigError, exit 2,
        at start; a running session keeps its state on a bad edit). Use as run_up's ``load``."""
        units = [u for u in (*config.intercepts, *config.forwards)
                 if not self.only or getattr(u, "name", None) in self.only or getattr(u, "service", None) in self.only]
        units += [config.connection] if config.connection else []  # --only never leaves the connection out
        targets = resolve_targets(config, selected=self.kube_context, selected_by=self.context_by, units=units,
                                  kubeconfig=Kubeconfig.read(self.kubeconfig) if config.contexts else None)
        self._resolved = (config, targets)
        return config

    def _targets(self, config: Config) -> Targets:
        if self._resolved is None or self._resolved[0] is not config:
            self.checked(config)
        assert self._resolved is not None
        return self._resolved[1]

    async def place(self, config: Config, uctx: UpContext, unit: Any) -> tuple[Kube, str, str | None]:
        """A unit's Kube, namespace and context name (None in a file without ``contexts:``).

        The hook for every kind of unit that talks to a cluster: ``unit`` is the config item (an
        intercept, a forward, the ``connect:`` section), read for its ``context`` and ``namespace``;
        end the unit's key with the returned context name and give its spec a ``context``
        attribute (status shows it). The namespace: ``-n``, else the unit's own, else its
        ``contexts:`` entry's, else the file's, else its kubeconfig context's."""
        if self.clusters is None:
            self.clusters = Clusters(uctx.resources, self.kubeconfig)
        target = self._targets(config).of(unit)
        ns = self.namespace_override or getattr(unit, "namespace", None) or target.namespace or config.namespace
        try:
            kube = await self.clusters.kube(target)
        except ContextDown as down:  # its units stand in as DownSpecs, keyed as they will be
            down.placed = (ns or self.clusters.namespace_of(target), target.name if config.contexts else None)
            raise
        return kube, ns or kube.namespace, target.name if config.contexts else None

    async def _place_or_down(self, config: Config, uctx: UpContext, unit: Any) -> tuple[Any, str, str | None]:
        """:meth:`place`, or for a unit whose context cannot be opened: (its ContextDown, namespace, context)."""
        try:
            return await self.place(config, uctx, unit)
        except ContextDown as down:
            return (down, *down.placed)

    def _env_for(self, key: Key, namespace: str | None = None, explicit: frozenset[str] = frozenset()
                 ) -> Callable[[], Any]:
        async def env() -> dict[str, str]:
            run = self.runs.get(key)
            unit = run.env_unit() if run else None
            # The pod's env, but this machine's PATH, HOME... (tpenv/engine/localenv.py): the
            # handler runs here. ``explicit``: names the config's env.set/rewrite gives.
            values = command_env(unit.env, explicit) if unit else {}
            # Under connect (env mode) the pod's own names (DB_HOST=db) are made to reach the
            # cluster from here: port maps and proxy variables, resolved as the pod would.
            if self.connection is not None and namespace is not None:
                values = await self.connection.env_for(values, namespace)
            return values
        return env

    def _wrap_for(self, ic: Any) -> Callable[[list[str]], list[str]]:
        """Under connect in ns mode, the handler runs in its own namespaces, its intercept's port
        delivered inside; other modes: as is. Asked at each start (the connection may be new)."""
        def wrap(argv: list[str]) -> list[str]:
            return self.connection.wrap(argv, inbound=[ic.port.local]) if self.connection is not None else argv
        return wrap

    async def _connect_spec(self, config: Config, uctx: UpContext, namespaces: list[str]) -> UnitSpec | None:
        """The connect unit, when the file has a ``connect:`` section not set to off."""
        if config.connection is None:
            return None
        from tpenv.engine.outbound.unit import ConnectSpec  # a file without connect: never loads it

        kube, ns, context = await self._place_or_down(config, uctx, config.connection)
        return DownSpec.instead_of(ConnectSpec(kube, config.connect, ns, tuple(namespaces), context=context,
                                               on_ready=self._connected))

    def _connected(self, unit: Any) -> None:
        self.connection = unit

    async def __call__(self, config: Config, uctx: UpContext) -> dict[Key, UnitSpec]:
        if self.clusters is not None:
            self.clusters.new_pass()  # a context that could not be opened is tried again
        specs: dict[Key, UnitSpec] = {}
        wanted = [ic for ic in config.intercepts if uctx.wanted(ic.name)]
        fwd_wanted = [fw for fw in config.forwards if uctx.wanted(fw.service)]
        connect = await self._connect_spec(config, uctx, [])
        if connect is None:
            self.connection = None
        if not wanted and not fwd_wanted:
            return {**handler_specs(config, uctx), **({connect.key: connect} if connect else {})}
        base_dir = config.source.parent if config.source else Path.cwd()
        keys: dict[str, Key] = {}
        waiting: set[str] = set()
        contexts: dict[Key, str | None] = {}
        for ic in wanted:
            kube, ns, context = await self._place_or_down(config, uctx, ic)
            spec = DownSpec.instead_of(InterceptSpec(kube, ic, ns, uctx.session_id, self.settings, base_dir,
                                                     self.runs, self.ready_hashes, context=context))
            specs[spec.key] = spec
            keys[ic.name] = spec.key
            contexts[spec.key] = context
            # A handler runs with its intercept's env: only once that intercept (as now specified)
            # serves (tunnels and env ready; the route probe may still run). Until then it is left
            # out; the intercept's "serving" event brings it in.
            if self.ready_hashes.get(spec.key) != spec.spec_hash:
                waiting.add(ic.name)
        placed = {id(fw): await self._place_or_down(config, uctx, fw) for fw in fwd_wanted}
        forwards: dict[Key, Any] = {}
        if fwd_wanted:
            # Imported here: forwards pull in the port-forward transports, which a file of
            # intercepts alone loads while its first rollout runs (lateimports.py), not before.
            from tpenv.engine.forwards import forward_specs

            forwards = forward_specs(config, lambda fw: placed[id(fw)], uctx.wanted,
                                     connect_timeout=self.settings.tunnels.connect_timeout)
            forwards = {k: DownSpec.instead_of(f) for k, f in forwards.items()}
        specs.update(forwards)
        contexts.update({k: f.context for k, f in forwards.items()})
        self.contexts = contexts
        if connect is not None:  # short names of the intercepted workloads' namespaces first, as their pods see them
            connect = await self._connect_spec(config, uctx, [key[1] for key in keys.values()])
            specs[connect.key] = connect
        after = frozenset({connect.key}) if connect is not None else frozenset()
        def env_for(ic: Intercept) -> Callable[[], Any]:
            return self._env_for(keys[ic.name], keys[ic.name][1], frozenset(ic.env.set) | frozenset(ic.env.rewrite))
        handlers = handler_specs(config, uctx, env_for=env_for,
                                 depends_on=lambda ic: frozenset({keys[ic.name]}) | after,
                                 wrap_for=lambda ic: self._wrap_for(ic) if connect is not None else None)
        specs.update({k: h for k, h in handlers.items() if h.name not in waiting})
        return specs
