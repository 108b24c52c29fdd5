"""Structured logs: one JSON object per line on stderr, each message prefixed by its unit.

Units are ``[kind/name]`` (``[listener/http]``, ``[session/abc]``) so a reader can follow one
piece of the agent through interleaved output. Messages name things (ports, intercept ids,
variable names); they never carry variable values or key material.
"""
from __future__ import annotations

import json
import logging
import sys
import time


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        unit = getattr(record, "unit", None)
        if unit:
            entry["unit"] = unit
        if record.exc_info and record.exc_info[1] is not None:
            # The exception's type and text, not a traceback full of locals.
            exc = record.exc_info[1]
            entry["error"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(entry, ensure_ascii=False)


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # asyncssh logs every channel at INFO; that is noise on the data path.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


class _UnitAdapter(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        unit = self.extra["unit"]
        kwargs["extra"] = {**kwargs.get("extra", {}), "unit": unit[1:-1]}
        return f"{unit} {msg}", kwargs


def unit(kind: str, name: object) -> logging.LoggerAdapter:
    """A logger for one unit of the agent, prefixing every message with ``[kind/name]``."""
    return _UnitAdapter(logging.getLogger(f"tpenv_agent.{kind}"), {"unit": f"[{kind}/{name}]"})
