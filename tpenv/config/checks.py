"""Checks across the whole file, on the plain data: duplicates, and paths that must exist on disk.

They run even when pydantic found problems elsewhere (the user gets everything at
once), so they read the data defensively and skip whatever pydantic will report.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from pydantic_core import PydanticCustomError

from tpenv.config.models import did_you_mean, parse_port
from tpenv.errors import Problem


def check(data: dict[str, Any], loc: Any, base: Path) -> list[Problem]:
    intercepts = [(i, ic) for i, ic in enumerate(_list(data.get("intercepts"))) if isinstance(ic, dict)]
    forwards = [(i, fw) for i, fw in enumerate(_list(data.get("forwards"))) if isinstance(fw, dict)]
    return [*_duplicate_names(intercepts, loc), *_duplicate_ports(intercepts, forwards, loc),
            *_run_paths(intercepts, loc, base), *_undeclared_contexts(data, intercepts, forwards, loc)]


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _duplicate_names(intercepts: list[tuple[int, dict]], loc: Any) -> list[Problem]:
    seen: dict[str, int] = {}
    out = []
    for i, ic in intercepts:
        name, key = ic.get("name"), "name"
        if name is None and isinstance(ic.get("workload"), str):
            name, key = ic["workload"].rpartition("/")[2], "workload"  # the default name
        if not isinstance(name, str):
            continue
        path = ("intercepts", i, key)
        if name in seen:
            first = loc.at(("intercepts", seen[name], "name"), key=True)[0]
            out.append(loc.problem(path, f"intercepts[{i}]: duplicate intercept name '{name}' (first at line {first})",
                                   "give each intercept its own `name:`"))
        else:
            seen[name] = i
    return out


def _duplicate_ports(intercepts: list[tuple[int, dict]], forwards: list[tuple[int, dict]], loc: Any) -> list[Problem]:
    used: dict[int, tuple[str, int]] = {}  # local port → (who, line)
    out = []

    def claim(port: int, who: str, path: tuple) -> None:
        if port in used:
            other, line = used[port]
            out.append(loc.problem(path, f"{who}: local port {port} is already used by {other} (line {line})",
                                   "each intercept and forward needs its own local port"))
        else:
            used[port] = (who, loc.at(path)[0])

    for i, ic in intercepts:
        try:
            port = parse_port(ic.get("port"))
        except PydanticCustomError:
            continue  # pydantic reports it
        if isinstance(port, dict) and isinstance(port.get("local"), int):
            claim(port["local"], f"intercepts[{i}]", ("intercepts", i, "port"))
    for i, fw in forwards:
        local, key = fw.get("local"), "local"
        if local is None:
            local, key = fw.get("port"), "port"
        if isinstance(local, str) and local.isdecimal():
            local = int(local)
        if isinstance(local, int) and not isinstance(local, bool) and 1 <= local <= 65535:
            claim(local, f"forwards[{i}]", ("forwards", i, key))
    return out


def _undeclared_contexts(data: dict[str, Any], intercepts: list[tuple[int, dict]],
                         forwards: list[tuple[int, dict]], loc: Any) -> list[Problem]:
    """A unit's (an intercept's, a forward's, the connection's) ``context:`` must name an entry of
    ``contexts:`` (a kubeconfig context name would tie the shared file to one reader's kubeconfig)."""
    declared = [k for k in data.get("contexts") or {} if isinstance(k, str)] \
        if isinstance(data.get("contexts"), dict) else []
    connect = data.get("connect")
    units = [((what, i), item) for what, items in (("intercepts", intercepts), ("forwards", forwards))
             for i, item in items]
    units += [(("connect",), connect)] if isinstance(connect, dict) else []
    out = []
    for path, item in units:
        name = item.get("context")
        if not isinstance(name, str) or name in declared:
            continue
        where = path[0] + "".join(f"[{i}]" for i in path[1:])
        if declared:
            msg = f"{where}.context: no context {name!r} in contexts: (declared: {', '.join(declared)})"
            hint = did_you_mean(name, declared) or "name one of the declared contexts"
        else:
            msg = f"{where}.context: {name!r} names no entry: the file declares no contexts:"
            hint = "declare it under contexts: (with server, cluster or contexts to find it in a kubeconfig)"
        out.append(loc.problem((*path, "context"), msg, hint))
    return out


def _run_paths(intercepts: list[tuple[int, dict]], loc: Any, base: Path) -> list[Problem]:
    out = []
    for i, ic in intercepts:
        run = ic.get("run")
        if not isinstance(run, dict):
            continue
        cwd = run.get("cwd", ".")
        if not isinstance(cwd, str) or "\0" in cwd:
            continue
        directory = base / os.path.expanduser(cwd)
        if not directory.is_dir():
            if "cwd" in run:
                out.append(loc.problem(("intercepts", i, "run", "cwd"),
                                       f"intercepts[{i}].run.cwd: directory {cwd!r} does not exist"))
            continue
        for j, pattern in enumerate(_list(run.get("watch"))):
            if not isinstance(pattern, str):
                continue
            if "\0" in pattern or not _matches(pattern, directory):
                out.append(loc.problem(("intercepts", i, "run", "watch", j),
                                       f"intercepts[{i}].run.watch[{j}]: {pattern!r} matches no file under {cwd!r}",
                                       "globs are relative to run.cwd; ** matches any depth"))
    return out


def _matches(pattern: str, directory: Path) -> bool:
    try:
        matches = glob.iglob(pattern, root_dir=directory, recursive=True, include_hidden=True)
        return any(True for _ in matches)
    except (OSError, ValueError):
        return False
