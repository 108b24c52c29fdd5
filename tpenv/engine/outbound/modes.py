"""Which capture sits in front of the outbound core, and why (``auto``: host with root, else ns
where unprivileged user namespaces work, else env), said in one line the user sees.

The captures live in ``tpenv.kits.capture_host`` and ``tpenv.kits.capture_ns``; ``env`` is
``tpenv.engine.outbound.envmode``. A capture this build does not have is reported as such,
never pretended.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from tpenv.errors import MissingTool, UsageError

MODES = ("auto", "host", "ns", "env", "off")


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def userns_problem() -> str | None:
    """Why this machine cannot give an unprivileged process its own namespaces (None: it can)."""
    if not _have("tpenv.kits.capture_ns"):
        return "the ns capture is not part of this build of tpenv"
    from tpenv.kits.capture_ns import userns_problem as problem

    return problem()


@dataclass(frozen=True)
class Choice:
    mode: str  # host | ns | env | off
    why: str


def choose(wanted: str, *, is_root: bool | None = None, command: bool = False) -> Choice:
    """The capture for ``wanted`` (auto, host, ns, env, off; or the older root, rootless).
    ``command``: a command will be run under it (ns mode needs one: it captures per command)."""
    wanted = {"root": "host"}.get(wanted, wanted)
    is_root = os.geteuid() == 0 if is_root is None else is_root
    if wanted == "off":
        return Choice("off", "connect: mode off")
    if wanted == "env":
        return Choice("env", "asked for (mode env): a local SOCKS5/HTTP proxy and port maps in the command's env")
    if wanted == "host":
        if not is_root:
            raise UsageError("mode host needs root (it redirects this machine's traffic to the cluster)",
                             hint="run it with sudo, or use mode ns (per command, no root) or env")
        if not _have("tpenv.kits.capture_host"):
            raise MissingTool("mode host: the host capture is not part of this build of tpenv", hint="use mode env")
        return Choice("host", "asked for (mode host)")
    ns_problem = userns_problem() if command or wanted == "ns" else "no command to run in its own namespaces"
    if wanted == "ns":
        if ns_problem:
            raise MissingTool(f"mode ns: {ns_problem}", hint="or use mode env")
        return Choice("ns", "asked for (mode ns): the command runs in its own network namespace")
    if wanted == "rootless":
        if not ns_problem:
            return Choice("ns", "rootless: the command runs in its own network namespace")
        return Choice("env", f"rootless: ns is not possible ({ns_problem}), so env")
    if wanted != "auto":
        raise UsageError(f"unknown connect mode {wanted!r}", hint=f"one of {', '.join(MODES)}")
    if is_root and _have("tpenv.kits.capture_host"):
        return Choice("host", "auto: running as root, so the whole machine (host)")
    reason = "not root" if not is_root else "the host capture is not part of this build"
    if not ns_problem:
        return Choice("ns", f"auto: {reason}, so the command runs in its own network namespace (ns)")
    return Choice("env", f"auto: {reason} and ns is not possible ({ns_problem}), so a local proxy (env)")


__all__ = ["choose", "Choice", "userns_problem", "MODES"]
