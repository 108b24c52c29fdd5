"""The reconciler's diff step: :func:`plan`, a plain function from the desired and the running
units to what must stop and start, in dependency order (docs/reconciler.md, "The diff").

Apart from the loop (reconciler.py) because it is pure: no events, no time, no I/O, so it is
read and tested on its own.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tpenv.engine.units import Key, key_text
from tpenv.errors import PermanentError

class DependencyCycle(PermanentError):
    """Units depend on each other in a circle: none of them could ever start."""


@dataclass
class Plan:
    """What one pass does. ``stop``/``start`` are flat, ordered lists; ``stop_waves`` and
    ``start_waves`` group them into steps whose members may run concurrently."""

    stop: list[Key] = field(default_factory=list)
    start: list[Key] = field(default_factory=list)
    keep: list[Key] = field(default_factory=list)
    stop_waves: list[list[Key]] = field(default_factory=list)
    start_waves: list[list[Key]] = field(default_factory=list)
    why: dict[Key, str] = field(default_factory=dict)  # a reason per stopped/started key, for logs

    @property
    def empty(self) -> bool:
        return not self.stop and not self.start


def _order(k: Key) -> str:
    return repr(k)  # keys may mix str and int parts: compare their text for a stable order


def _waves(nodes: set[Key], deps: Mapping[Key, Iterable[Key]]) -> list[list[Key]]:
    """Kahn's algorithm in layers: each wave's nodes depend only on earlier waves (or outside
    ``nodes``). Raises DependencyCycle naming the units left in a cycle."""
    pending = {n: {d for d in deps.get(n, ()) if d in nodes and d != n} for n in nodes}
    self_loops = sorted((n for n in nodes if n in set(deps.get(n, ()))), key=_order)
    if self_loops:
        raise DependencyCycle(f"unit {key_text(self_loops[0])} depends on itself")
    waves: list[list[Key]] = []
    while pending:
        ready = sorted((n for n, d in pending.items() if not d), key=_order)
        if not ready:
            names = ", ".join(key_text(k) for k in sorted(pending, key=_order))
            raise DependencyCycle(f"units depend on each other in a cycle: {names}")
        waves.append(ready)
        for n in ready:
            del pending[n]
        for d in pending.values():
            d.difference_update(ready)
    return waves


def plan(desired: Mapping[Key, Any], actual: Mapping[Key, Any], restart: Iterable[Key] = ()) -> Plan:
    """Diff desired specs against running units (both expose ``spec_hash`` and ``depends_on``).

    - unchanged -> keep; changed spec_hash -> stop, then start; removed -> stop; new -> start;
    - ``restart``: running keys to restart even though unchanged (they failed);
    - every running dependent of a stopped unit is stopped first and started again after
      (if still desired);
    - stop order: dependents before dependencies; start order: dependencies before dependents;
    - a dependency cycle among the desired units raises :class:`DependencyCycle`.
    """
    desired_deps = {k: frozenset(s.depends_on) for k, s in desired.items()}
    actual_deps = {k: frozenset(u.depends_on) for k, u in actual.items()}
    _waves(set(desired), desired_deps)  # reject cycles even when nothing would move

    why: dict[Key, str] = {}
    for k in actual:
        if k not in desired:
            why[k] = "removed"
        elif desired[k].spec_hash != actual[k].spec_hash:
            why[k] = "changed"
    for k in restart:
        if k in actual and k not in why:
            why[k] = "failed"

    # Cascade to running dependents, transitively (a tunnel restart restarts its intercepts).
    dependents: dict[Key, set[Key]] = {}
    for k, deps in actual_deps.items():
        for d in deps:
            dependents.setdefault(d, set()).add(k)
    stack = list(why)
    while stack:
        k = stack.pop()
        for dep in sorted(dependents.get(k, ()), key=_order):
            if dep not in why:
                why[dep] = f"{key_text(k)} restarts" if k in desired else f"{key_text(k)} removed"
                stack.append(dep)

    stopping = set(why)
    starting = {k for k in desired if k not in actual or k in stopping}
    for k in desired:
        if k not in actual:
            why[k] = "new"

    # Stop waves: reverse of the dependency order among the stopped units.
    stop_waves = list(reversed(_waves(stopping, actual_deps)))
    start_waves = _waves(starting, desired_deps)
    return Plan(
        stop=[k for w in stop_waves for k in w],
        start=[k for w in start_waves for k in w],
        keep=sorted((k for k in actual if k not in stopping), key=_order),
        stop_waves=stop_waves,
        start_waves=start_waves,
        why=why,
    )


__all__ = ["DependencyCycle", "Plan", "plan"]
