"""The handler's environment: render it from the app's env and the config, write it as an env file.

Order (DESIGN, "Env"): the app container's env as the agent reports it, then
TELEPRESENCE_ROOT / TELEPRESENCE_INTERCEPT_ID, then ``mount.rewrite_env`` (paths moved
under the local mount root), then ``env.set``, then ``env.rewrite`` in file order (each
template sees the result of the ones before it). Values are secrets: errors name
variables, never values.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tpenv.config.models import ENV_FORMATS, Intercept, compile_template
from tpenv.errors import ConfigError, PermanentError, Problem, UsageError

FORMATS = ENV_FORMATS
_SH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def render_env(base_env: Mapping[str, str], intercept: Intercept, mount_root: str | Path | None,
               intercept_id: str, *, namespace: str | None = None) -> dict[str, str]:
    """The environment for ``intercept``'s handler; ConfigError (located) when a rewrite template fails."""
    env = dict(base_env)
    root = str(mount_root) if mount_root else ""
    if root:
        env["TELEPRESENCE_ROOT"] = root
    env["TELEPRESENCE_INTERCEPT_ID"] = intercept_id
    if root:
        for name in intercept.mount.rewrite_env:
            if env.get(name):
                env[name] = root.rstrip("/") + "/" + env[name].lstrip("/")
    env.update(intercept.env.set)
    for name, source in intercept.env.rewrite.items():
        variables = {"value": env.get(name, ""), "name": name, "namespace": namespace or intercept.namespace or "",
                     "env": dict(env), "mount_root": root, "intercept_id": intercept_id}
        try:
            env[name] = compile_template(source).render(**variables)
        except Exception as e:  # user code: undefined names, sandbox refusals, arithmetic...
            where = intercept.env._where.get(name)
            file, line, col = where if where else ("telepresence.yaml", 0, 0)
            raise ConfigError([Problem(file, line, col,
                                       f"env.rewrite.{name}: template failed: {type(e).__name__}: {e}")]) from e
    return env


def format_env(env: Mapping[str, str], fmt: str) -> str:
    """``env`` as the text of an env file in ``fmt``; PermanentError for what the format cannot hold."""
    if fmt == "json":
        return json.dumps(dict(env), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if fmt not in FORMATS:
        raise UsageError(f"unknown env format {fmt!r}", hint="use one of: " + ", ".join(FORMATS))
    lines = []
    bad: list[str] = []
    for name in sorted(env):
        value = env[name]
        if fmt == "sh":
            if not _SH_NAME.fullmatch(name):
                bad.append(name)
                continue
            lines.append(f"export {name}={_sh_quote(value)}")
        elif fmt == "docker":
            # docker --env-file takes the rest of the line verbatim: no quoting, no newlines.
            if "\n" in value or "\r" in value or "=" in name or name.startswith("#") or not name.strip() \
                    or any(c.isspace() for c in name):
                bad.append(name)
                continue
            lines.append(f"{name}={value}")
        else:  # compose
            if "=" in name or name.startswith("#") or any(c.isspace() for c in name):
                bad.append(name)
                continue
            lines.append(f"{name}={_compose_quote(value)}")
    if bad:
        raise PermanentError(f"the {fmt} env format cannot hold the variables {', '.join(bad)}",
                             hint="use the json format" if fmt == "docker" else "use the docker or json format")
    return "".join(line + "\n" for line in lines)


def write_env_file(env: Mapping[str, str], path: str | Path, format: str) -> None:
    """Write ``env`` to ``path`` atomically, readable by the owner only (values are secrets)."""
    text = format_env(env, format)
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise PermanentError(f"cannot write the env file {path}: {e.strerror or e}") from e


def _sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _compose_quote(value: str) -> str:
    # Single quotes are literal in compose's .env (no escapes, no ${} interpolation); when the value
    # holds a quote, a line break or a backslash (readers take \' as an escaped quote even inside
    # single quotes: a value ending in \ never closed), double quotes with backslash escapes, and
    # $$ for a literal $.
    if not any(c in value for c in "'\n\r\\"):
        return f"'{value}'"
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
               .replace("$", "$$"))
    return f'"{escaped}"'


__all__ = ["render_env", "write_env_file", "format_env", "FORMATS"]
