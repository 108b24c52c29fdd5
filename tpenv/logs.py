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
import sys
from typing import Any

NOISY = ("asyncssh", "kubernetes", "websockets", "urllib3")
_MARK = "_tpenv_handler"  # attribute marking the handler we installed, so a second setup replaces it


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")


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
        return _json.dumps(obj, ensure_ascii=False)


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


__all__ = ["setup_logging", "unit_logger", "NOISY"]
