"""Logging: one handler on stderr, a ``[kind/name]`` prefix per unit, text or JSON lines.

Units (``intercept/web``, ``tunnel/web-7d9f-abc``, ``handler/web``) log through
``unit_logger`` so a reader can follow one unit in an interleaved log. The noisy
libraries (asyncssh, kubernetes, websockets, urllib3) stay at WARNING unless
``--debug``: their INFO lines bury ours and may carry request details.
"""
from __future__ import annotations

import datetime as _dt
import json as _json
import logging
import re
import sys
import threading
from typing import Any, Iterable

NOISY = ("asyncssh", "kubernetes", "websockets", "urllib3")
_MARK = "_tpenv_handler"  # attribute marking the handler we installed, so a second setup replaces it

# --- secrets never reach the log (issue 12) ----------------------------------------------------
# Libraries log at DEBUG what they send (websockets prints the handshake headers, bearer token
# included), so redaction is done where every record ends up: our formatters. Two nets: shapes
# that are secrets whatever their value (bearer tokens, JWTs, PEM private keys), and values
# registered by whoever learns them (``secret()``: ${VAR} expansions in the config, the app's
# Secret-backed env values).
REDACTED = "***"
_SHAPES = [
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)((?:authorization|x-api-key|cookie|proxy-authorization)\s*[:=]\s*)[^\r\n'\"]+"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]+"),
    re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)"),
]
# Shorter values are not registered: masking "on" or "8080" everywhere would garble every log
# line, and a secret that short is not one.
MIN_SECRET_LEN = 6
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_secrets_re: re.Pattern[str] | None = None


def secret(*values: str | None) -> None:
    """Never print these values (from now on, at any level, in any logger)."""
    global _secrets_re
    new = {v for v in values if v and len(v) >= MIN_SECRET_LEN} - _secrets
    if not new:
        return
    with _secrets_lock:
        _secrets.update(new)
        # Longest first, so a secret containing another is masked whole.
        _secrets_re = re.compile("|".join(re.escape(v) for v in sorted(_secrets, key=len, reverse=True)))


# Env variable names whose values are secrets whatever their source; the engine adds the names
# the pod spec fills from a Secret.
SECRET_NAME = re.compile(r"(?i)(pass|secret|token|key|credential|auth|private|dsn|cookie|session)")


def secret_env(env: dict[str, str], names: Iterable[str] = ()) -> None:
    """Register the values of ``env`` that are secrets: the ``names`` given (Secret-backed) and
    every variable whose name says so."""
    wanted = set(names)
    secret(*(v for k, v in env.items() if k in wanted or SECRET_NAME.search(k)))


def redact(text: str) -> str:
    for shape in _SHAPES:
        text = shape.sub(lambda m: (m.group(1) if m.re.groups else "") + REDACTED, text)
    pattern = _secrets_re
    return pattern.sub(REDACTED, text) if pattern is not None else text


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, unit, message (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        unit = getattr(record, "unit", None)
        message = record.getMessage()
        if unit and message.startswith(f"[{unit}] "):
            message = message[len(unit) + 3:]  # the unit has its own field here
        obj: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "unit": unit,
            "message": message,
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return redact(_json.dumps(obj, ensure_ascii=False))


def setup_logging(debug: bool, json: bool, stream=None) -> None:
    """Install tpenv's handler on the root logger (replacing a previous one of ours)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _MARK, True)
    handler.setFormatter(_JsonFormatter() if json else _TextFormatter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)


class UnitLogger(logging.LoggerAdapter):
    """Prefixes ``[kind/name]`` and records ``unit`` on every record."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        unit = self.extra["unit"]  # type: ignore[index]
        kwargs["extra"] = {**kwargs.get("extra", {}), "unit": unit}
        return f"[{unit}] {msg}", kwargs


def unit_logger(kind: str, name: str) -> logging.LoggerAdapter:
    """A logger for one unit of work, e.g. ``unit_logger("intercept", "web")``."""
    return UnitLogger(logging.getLogger(f"tpenv.{kind}"), {"unit": f"{kind}/{name}"})


__all__ = ["setup_logging", "unit_logger", "NOISY", "secret", "secret_env", "redact"]
