"""Team mode (issue 4): the cluster's manager makes personal header intercepts the default.

``tpenv manager install --team-mode`` writes ``team_mode: "true"`` in ConfigMap
``tpenv/tpenv-manager`` (docs/protocol.md §1.2). Every client reads it once per run (one read
per Kube connection, shared by all intercepts of a ``tpenv up``), and an intercept that gives
no ``match`` then takes only the requests carrying its personal header
(``x-telepresence-intercept-id: <session>:<name>``). ``match: all`` / ``--http-header all``
still takes every connection.
"""
from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from tpenv.config.models import Match
from tpenv.errors import Forbidden, NotFound
from tpenv.kits.kube import What

log = logging.getLogger("tpenv.teammode")

# Where `tpenv manager install` keeps it; tpenv.engine.manager takes the names from here (this
# module is light: every intercept reads the ConfigMap, and the renderer pulls in jinja2).
NAMESPACE = "tpenv"
CONFIGMAP = "tpenv-manager"
NOTE = "team mode: personal intercept by default; `--http-header all` / `match: all` for all traffic"

_reads: "weakref.WeakKeyDictionary[Any, asyncio.Future[bool]]" = weakref.WeakKeyDictionary()


def effective_match(match: Match | str | None, team_mode: bool) -> Match | None:
    """The rule an intercept registers: ``all`` → every connection (None); no rule → the
    personal header in team mode, every connection otherwise; a rule → itself."""
    if match == "all":
        return None
    if isinstance(match, Match):
        return match
    if match is not None:
        raise ValueError(f"not a match: {match!r}")
    return Match(headers="auto") if team_mode else None


def defaulted(match: Match | str | None, team_mode: bool) -> bool:
    """True when team mode chose the personal header (the output says so)."""
    return match is None and team_mode


def parse_team_mode(configmap: dict[str, Any] | None) -> bool:
    return configmap is not None and (configmap.get("data") or {}).get("team_mode") == "true"


async def _read(kube: Any) -> bool:
    try:
        cm = await kube.call(kube.core.read_namespaced_config_map, CONFIGMAP, NAMESPACE,
                             what=What("get", "configmaps", NAMESPACE, CONFIGMAP))
    except (NotFound, Forbidden) as e:
        # No manager, or no right to read its ConfigMap: team mode is off (§1.2).
        log.debug("team mode off: %s", e)
        return False
    on = parse_team_mode(cm)
    log.debug("team mode %s (ConfigMap %s/%s)", "on" if on else "off", NAMESPACE, CONFIGMAP)
    return on


async def team_mode(kube: Any) -> bool:
    """Whether this cluster's manager asks for team mode; read once per Kube connection (a
    failed read is not kept: the next caller asks again)."""
    fut = _reads.get(kube)
    if fut is None or (fut.done() and (fut.cancelled() or fut.exception() is not None)):
        fut = asyncio.ensure_future(_read(kube))
        _reads[kube] = fut
    return await asyncio.shield(fut)


__all__ = ["effective_match", "defaulted", "parse_team_mode", "team_mode", "NOTE", "CONFIGMAP", "NAMESPACE"]
