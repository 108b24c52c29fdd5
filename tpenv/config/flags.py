"""`tpenv intercept` flags → the same Intercept model telepresence.yaml gives, so both mean one thing.

The one builder from flags to the model: the verb (tpenv/cli/verbs/intercept.py, which declares
the flags) calls ``intercept_from_flags(args)``; a bad flag is a UsageError naming the flag, with
the model's own message. Paths given in flags are relative to where the user stands.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from pydantic import ValidationError

from tpenv.config.models import Intercept
from tpenv.errors import UsageError

DEFAULT_PORT = "8080"  # Telepresence's default local port
_FLAG = {"workload": "WORKLOAD", "port": "--port", "service": "--service", "headers": "--http-header",
         "path_prefix": "--http-path-prefix", "path_equal": "--http-path-equal", "path_regex": "--http-path-regex",
         "format": "--env-syntax", "file": "--env-file", "mount": "--mount", "mode": "--mount-mode", "namespace": "-n",
         "command": "CMD", "name": "--name", "rewrite_env": "--rewrite-env"}


def _headers(values: list[str]) -> Any:
    if not values:
        return None
    if values in (["auto"], ["all"]):
        return values[0]
    headers: dict[str, str] = {}
    for item in values:
        name, sep, regex = item.partition("=")
        if item in ("auto", "all") or not sep or not name:
            raise UsageError(f"--http-header {item!r}: expected NAME=REGEX, or 'auto' or 'all' alone",
                             hint="e.g. --http-header x-dev=alice, --http-header auto for your personal header, "
                                  "--http-header all for every connection (also in team mode)")
        headers[name] = regex
    return headers


def _mount(value: str | None, mode: str | None = None, rewrite_env: list[str] | None = None) -> Any:
    if value is None or value.lower() == "true":
        path: Any = True
    elif value.lower() == "false":
        path = False
    else:
        path = os.path.abspath(value)  # a flag's path is relative to where the user stands
    if mode is None and not rewrite_env:
        return path
    if path is False:
        flag = "--rewrite-env" if rewrite_env else "--mount-mode"
        raise UsageError(f"{flag} needs a mount (--mount false turns it off)")
    return {"path": path, "mode": mode or "auto", "rewrite_env": list(rewrite_env or [])}


def _check_modes(args: argparse.Namespace) -> None:
    """--mirror and --replace: each excludes what cannot work with it, said in the flags' words."""
    replacing = getattr(args, "replace", False)
    if replacing and getattr(args, "mirror", False):
        raise UsageError("--mirror and --replace cannot be combined: --mirror keeps the app answering every "
                         "request and sends this machine copies, --replace stops the app and sends this machine "
                         "everything", hint="choose one of them")
    rules = [h for h in getattr(args, "http_header", None) or [] if h != "all"]
    if replacing and (rules or any(getattr(args, f"http_path_{k}", None) for k in ("prefix", "equal", "regex"))):
        raise UsageError("--replace cannot be combined with --http-header/--http-path-*: the app stops, so "
                         "requests a rule leaves out would have no one to answer them",
                         hint="drop the rule, or intercept without --replace")


def intercept_from_flags(args: argparse.Namespace, *, namespace: str | None = None) -> Intercept:
    """The Intercept that ``tpenv intercept WORKLOAD --port ... [-- CMD]`` asks for."""
    _check_modes(args)
    match: dict[str, Any] = {"headers": _headers(getattr(args, "http_header", None) or [])}
    for kind in ("prefix", "equal", "regex"):
        value = getattr(args, f"http_path_{kind}", None)
        if value is not None:
            match[f"path_{kind}"] = value
    has_match: Any = any(v is not None for v in match.values())
    if match["headers"] == "all":  # every connection, also in team mode
        if len(match) > 1:
            raise UsageError("--http-header all takes every connection: it cannot be combined with --http-path-*")
        match, has_match = "all", True  # type: ignore[assignment]
    command = list(getattr(args, "command", None) or [])
    data: dict[str, Any] = {
        "workload": args.workload,
        "port": args.port or DEFAULT_PORT,
        "service": getattr(args, "service", None),
        "namespace": namespace,
        "match": match if has_match else None,
        "env": {"file": os.path.abspath(args.env_file) if getattr(args, "env_file", None) else None,
                "format": getattr(args, "env_syntax", None) or "docker"},
        "run": {"command": command, "cwd": os.getcwd(), "restart": "never"}
        if command and not getattr(args, "docker_run", False) else None,
    }
    mount, mode = getattr(args, "mount", None), getattr(args, "mount_mode", None)
    rewrite = getattr(args, "rewrite_env", None)
    if mount is not None or mode is not None or rewrite:
        # Only a mount asked for is set: unset, a machine without sshfs skips it (said once).
        data["mount"] = _mount(mount, mode, rewrite)
    if getattr(args, "name", None):
        data["name"] = args.name
    if getattr(args, "force", False):
        data["force"] = True
    if getattr(args, "mirror", False) or getattr(args, "replace", False):
        data["mode"] = "replace" if getattr(args, "replace", False) else "mirror"
    try:
        return Intercept.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            ctx = err.get("ctx") or {}
            message = ctx.get("message") if isinstance(ctx, dict) and "message" in ctx else err["msg"]
            flag = next((_FLAG[str(el)] for el in reversed(err["loc"]) if str(el) in _FLAG), None)
            if flag is None:  # a rule across keys (match): name the first flag its message mentions
                flag = next((f for key, f in _FLAG.items() if key in message), "a flag")
            problems.append(f"{flag}: {message}")
        raise UsageError("; ".join(dict.fromkeys(problems))) from e


__all__ = ["intercept_from_flags", "DEFAULT_PORT"]
