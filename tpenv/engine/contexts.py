"""Which cluster each unit of ``tpenv up`` talks to: `contexts:` resolved in the reader's kubeconfig.

A file without ``contexts:`` has one unnamed context (``context:``, ``--context``/``TPENV_CONTEXT``,
else the kubeconfig's current one): every unit uses it and unit keys carry no context. A file
with ``contexts:`` names its clusters; each entry is found in the reader's kubeconfig
(:meth:`Kubeconfig.match`), units choose one with ``context:`` (else the default: ``--context``,
``TPENV_CONTEXT``, the entry with ``default: true``, the first entry), and every unit key ends
with its context's name, so the same workload in two clusters makes two units.

:class:`Clusters` keeps one :class:`Kube` per kubeconfig context for the session: a unit only
ever holds its own context's client, so an outage of one cluster (or revoked credentials) fails
that context's units alone, and the reconciler retries them while the others keep running.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tpenv.engine.units import Notify, State, UnitState, hash_spec
from tpenv.errors import ConfigError, TpenvError, TransientError, UsageError
from tpenv.kits.kube import Kube
from tpenv.kits.kubeconfig import Kubeconfig


@dataclass(frozen=True)
class Target:
    """One resolved context: the entry's name (None: the unnamed context of a file without
    ``contexts:``), the kubeconfig context (None: the current one) and the entry's namespace."""

    name: str | None
    kube_context: str | None
    namespace: str | None = None


@dataclass(frozen=True)
class Targets:
    default: Target
    named: dict[str, Target]

    def of(self, unit: Any) -> Target:
        """The target of an intercept, a forward or the connection (its ``context:``, else the default)."""
        name = getattr(unit, "context", None)
        return self.named[name] if name else self.default


def resolve_targets(config: Any, *, selected: str | None = None, selected_by: str = "--context",
                    units: Iterable[Any] | None = None, kubeconfig: Kubeconfig | None = None) -> Targets:
    """Resolve the contexts ``units`` (default: :func:`cluster_units`) use.

    ``selected`` is ``--context`` or ``TPENV_CONTEXT`` (``selected_by`` says which, for messages):
    an entry of the file, or a context of the reader's kubeconfig. ConfigError (exit 2) lists,
    at each entry's line, the entries that match no kubeconfig context or several; UsageError
    when ``selected`` names neither an entry nor a kubeconfig context.
    """
    if not config.contexts:
        return Targets(Target(None, selected or config.context), {})
    kc = kubeconfig or Kubeconfig.read()
    units = cluster_units(config) if units is None else list(units)
    if selected and selected not in config.contexts:
        if kc.get(selected) is None:
            raise UsageError(
                f"{selected_by} {selected!r}: neither a context of {config.source or 'the file'} "
                f"({', '.join(config.contexts)}) nor of your kubeconfig ({', '.join(kc.names) or 'none'})",
                hint="name an entry of contexts:, or a context `kubectl config get-contexts` lists")
        default_name = None
    else:
        default_name = selected or config.default_context
    used = {u.context for u in units if getattr(u, "context", None)}
    if default_name and any(not getattr(u, "context", None) for u in units):
        used.add(default_name)
    named, problems = {}, []
    for name in config.contexts:
        if name not in used:
            continue  # an entry nobody here uses need not exist in this reader's kubeconfig
        target, problem = _match(config, name, kc)
        if problem is not None:
            problems.append(problem)
        else:
            named[name] = target
    if problems:
        raise ConfigError(problems, hint="`kubectl config get-contexts` lists your contexts; "
                                         "`kubectl config view --minify` shows the current one's server")
    default = named.get(default_name) if default_name else Target(selected, selected)
    return Targets(default or Target(default_name, None), named)


def cluster_units(config: Any) -> list[Any]:
    """The file's items that talk to a cluster: every intercept and forward, and the connection
    when the file asks for one."""
    return [*config.intercepts, *config.forwards, *([config.connection] if config.connection else [])]


def default_target(config: Any, *, selected: str | None = None, selected_by: str = "--context",
                   kubeconfig: Kubeconfig | None = None) -> Target:
    """The context of a unit naming none (what one-cluster verbs like `tpenv list` use)."""
    return resolve_targets(config, selected=selected, selected_by=selected_by, units=[_Unnamed()],
                           kubeconfig=kubeconfig).default


class _Unnamed:
    context = None


def _match(config: Any, name: str, kc: Kubeconfig) -> tuple[Target, Any]:
    entry = config.contexts[name]
    found = kc.match(server=entry.server, cluster=entry.cluster, candidates=entry.contexts)
    how = ", ".join(part for part in (
        f"server {entry.server}" if entry.server else "", f"cluster {entry.cluster}" if entry.cluster else "",
        f"contexts [{', '.join(entry.contexts)}]" if entry.contexts else "") if part)
    path = ("contexts", name)
    if not found:
        return Target(name, None), config.problem(
            path, f"contexts.{name}: no context of your kubeconfig matches ({how}); {kc.summary()}",
            "change the entry, or add your context's name to its contexts: list")
    if len(found) > 1:
        return Target(name, None), config.problem(
            path, f"contexts.{name}: {len(found)} contexts of your kubeconfig match ({how}): "
                  f"{', '.join(c.name for c in found)}; {kc.summary()}",
            "narrow it with cluster: or a contexts: list naming the one to use")
    return Target(name, found[0].name, entry.namespace), None


def entry_for(kube: Kube, kubeconfig: Kubeconfig) -> tuple[str, dict[str, Any]]:
    """A ``contexts:`` entry finding ``kube``'s cluster by its server URL (what `tpenv init` writes),
    named after the cluster; when the writer's own kubeconfig has several contexts on that server
    (two users of one cluster), the entry also lists this context's name, so it matches one."""
    mine = kubeconfig.get(kube.context or "") if kube.context else None
    raw = (mine.cluster if mine and mine.cluster else kube.context) or "cluster"
    name = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")[:63].strip("-") or "cluster"
    server = (mine.server if mine and mine.server else None) or kube.host
    entry: dict[str, Any] = {"server": server}
    if kube.context and len(kubeconfig.match(server=server)) > 1:
        entry["contexts"] = [kube.context]
    return name, entry


class Clusters:
    """One :class:`Kube` per kubeconfig context, opened on first use, closed with the session.

    A context whose client cannot be opened (its exec plugin fails, a certificate file is gone)
    raises :class:`ContextDown` and is tried again on a later pass; within one pass (``new_pass``)
    the failure is remembered, so its units do not each run the plugin again."""

    def __init__(self, resources: contextlib.AsyncExitStack, kubeconfig: str | None = None) -> None:
        self.resources = resources
        self.kubeconfig = kubeconfig
        self.kubes: dict[str | None, Kube] = {}
        self.down: dict[str | None, TpenvError] = {}

    def new_pass(self) -> None:
        self.down.clear()

    async def kube(self, target: Target) -> Kube:
        kube = self.kubes.get(target.kube_context)
        if kube is None:
            error = self.down.get(target.kube_context)
            if error is None:
                try:
                    kube = await Kube.load(self.kubeconfig, target.kube_context)
                except TpenvError as e:
                    error = self.down[target.kube_context] = e
            if error is not None:
                raise ContextDown(target, error)
            await self.resources.enter_async_context(kube)
            self.kubes[target.kube_context] = kube
        return kube

    def namespace_of(self, target: Target) -> str:
        """The namespace of ``target``'s kubeconfig context, read without opening it."""
        kc = Kubeconfig.read(self.kubeconfig)
        found = kc.get(target.kube_context or kc.current or "")
        return (found.namespace if found else None) or "default"


class ContextDown(TransientError):
    """A context's client could not be opened: its units fail with the reason, and are retried."""

    def __init__(self, target: Target, error: TpenvError) -> None:
        name = target.name or target.kube_context or "(current)"
        problems = getattr(error, "problems", None)  # a ConfigError made of a plain text: that text
        text = "; ".join(p.message for p in problems) if problems and problems[0].file == "<config>" else error.message
        super().__init__(f"context {name}: {text}", hint=error.hint, retry_after=2.0)
        self.target = target
        self.placed: tuple[str, str | None] = ("default", target.name)  # the unit's (namespace, context): place()


@dataclass(frozen=True)
class DownSpec:
    """Stands for a unit (same key) whose context is down: it fails at once with the reason, so
    status shows it, the reconciler retries it with backoff, and the units of other contexts
    start and run as usual. Once the context opens, the real spec (another hash) replaces it."""

    key: Any
    context: str | None
    error: ContextDown = field(compare=False)
    depends_on: frozenset = frozenset()

    @classmethod
    def instead_of(cls, spec: Any) -> Any:
        """``spec`` itself, or a DownSpec in its place when its ``kube`` is a :class:`ContextDown`
        (what ``UpFactory.place`` gives a unit whose context could not be opened)."""
        return cls(spec.key, spec.context, spec.kube) if isinstance(spec.kube, ContextDown) else spec

    @property
    def spec_hash(self) -> str:
        return hash_spec("down", list(self.key), self.error.message)

    def create(self, notify: Notify) -> "_DownUnit":
        return _DownUnit(self, notify)


class _DownUnit:
    """Fails its start with the context's error (the reconciler logs it once per attempt)."""

    def __init__(self, spec: DownSpec, notify: Notify) -> None:
        self.key, self.spec_hash, self.depends_on = spec.key, spec.spec_hash, spec.depends_on
        self.error = spec.error
        self.state = UnitState()

    async def start(self) -> None:
        raise TransientError(self.error.message, hint=self.error.hint, retry_after=self.error.retry_after)

    async def stop(self) -> None:
        self.state.set(State.STOPPED)

    def health(self) -> UnitState:
        return self.state

    def abort(self) -> None:
        pass


__all__ = ["Target", "Targets", "Clusters", "ContextDown", "DownSpec", "resolve_targets", "cluster_units", "default_target", "entry_for"]
