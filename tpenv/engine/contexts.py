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
from dataclasses import dataclass
from typing import Any

from tpenv.errors import ConfigError, UsageError
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
        """The target of an intercept or forward (its ``context:``, else the default)."""
        name = getattr(unit, "context", None)
        return self.named[name] if name else self.default


def resolve_targets(config: Any, *, selected: str | None = None, selected_by: str = "--context",
                    units: Iterable[Any] | None = None, kubeconfig: Kubeconfig | None = None) -> Targets:
    """Resolve the contexts ``units`` (default: every intercept and forward) use.

    ``selected`` is ``--context`` or ``TPENV_CONTEXT`` (``selected_by`` says which, for messages):
    an entry of the file, or a context of the reader's kubeconfig. ConfigError (exit 2) lists,
    at each entry's line, the entries that match no kubeconfig context or several; UsageError
    when ``selected`` names neither an entry nor a kubeconfig context.
    """
    if not config.contexts:
        return Targets(Target(None, selected or config.context), {})
    kc = kubeconfig or Kubeconfig.read()
    units = list(config.intercepts) + list(config.forwards) if units is None else list(units)
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
                  f"{'; '.join(c.describe() for c in found)}",
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
    """One :class:`Kube` per kubeconfig context, opened on first use, closed with the session."""

    def __init__(self, resources: contextlib.AsyncExitStack, kubeconfig: str | None = None) -> None:
        self.resources = resources
        self.kubeconfig = kubeconfig
        self.kubes: dict[str | None, Kube] = {}

    async def kube(self, target: Target) -> Kube:
        kube = self.kubes.get(target.kube_context)
        if kube is None:
            kube = await Kube.load(self.kubeconfig, target.kube_context)
            await self.resources.enter_async_context(kube)
            self.kubes[target.kube_context] = kube
        return kube


__all__ = ["Target", "Targets", "Clusters", "resolve_targets", "default_target", "entry_for"]
