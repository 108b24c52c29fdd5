"""Where a problem in telepresence.yaml is: positions by path (Locator), and pydantic's errors
turned into located Problems with what was expected and a suggestion (did you mean ...?).

loader.py fills the Locator while it converts the YAML, then asks ``_problems_from`` for the
problems of a failed validation.
"""
from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError

from tpenv.config.models import Config, did_you_mean
from tpenv.errors import Problem

Path_ = tuple[str | int, ...]


class Locator:
    """Positions (1-based line, column) of every key and value of one file, by path."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.values: dict[Path_, tuple[int, int]] = {}
        self.keys: dict[Path_, tuple[int, int]] = {}
        self.containers: set[Path_] = set()

    def at(self, path: Path_, *, key: bool = False) -> tuple[int, int]:
        # Containers and empty values are best shown at their key; scalars at the value itself.
        if key or path in self.containers or path not in self.values:
            if path in self.keys:
                return self.keys[path]
        for n in range(len(path), -1, -1):  # nearest known ancestor (merge keys, aliases)
            if path[:n] in self.values:
                return self.values[path[:n]]
        return (1, 1)

    def problem(self, path: Path_, message: str, suggestion: str | None = None, *, key: bool = False) -> Problem:
        line, col = self.at(path, key=key)
        return Problem(self.file, line, col, message, suggestion)


def dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the file"


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


# --- pydantic errors → problems -----------------------------------------------------------------------------------

_EXPECTED = {
    "string_type": "a string", "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false", "bool_parsing": "true or false",
    "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
}


def _resolve(data: Any, loc: tuple) -> Path_:
    """The longest real path along pydantic's ``loc``, skipping union tags and the key that is missing."""
    path: list[str | int] = []
    node = data
    for el in loc:
        if isinstance(node, dict) and isinstance(el, str) and el in node:
            node = node[el]
        elif isinstance(node, list) and isinstance(el, int) and 0 <= el < len(node):
            node = node[el]
        else:
            continue
        path.append(el)
    return tuple(path)


def _fields_at(data: Any, path: Path_) -> list[str]:
    """The keys the model at ``path`` allows, for "did you mean"."""
    model: Any = Config
    for el in path:
        if isinstance(el, int):
            continue
        field = model.model_fields.get(el) or next(
            (f for f in model.model_fields.values() if f.alias == el), None)
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    origin = getattr(annotation, "__origin__", None)
    return _model_in(origin) if origin is not None and origin is not annotation else None


def _problems_from(e: ValidationError, data: Any, loc: Locator, skip: set[Path_]) -> list[Problem]:
    out = []
    for err in e.errors(include_url=False):
        path = _resolve(data, err["loc"])
        if path in skip:
            continue
        etype, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
        where = dotted(path)
        suggestion = ctx.get("suggestion") if isinstance(ctx, dict) else None
        if etype == "extra_forbidden":
            name = str(path[-1]) if path else "?"
            parent = path[:-1]
            allowed = _fields_at(data, parent)
            msg = f"unknown key '{name}'" + (f" in {dotted(parent)}" if parent else "")
            suggestion = did_you_mean(name, allowed) or (f"allowed: {', '.join(allowed)}" if allowed else None)
            out.append(loc.problem(path, msg, suggestion, key=True))
            continue
        if etype == "missing":
            name = str(err["loc"][-1])
            msg = f"missing required key '{name}'" + (f" in {where}" if path else "")
            out.append(loc.problem(path, msg))
            continue
        if etype == "literal_error":
            choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
            msg = f"{where}: {value!r} is not one of {', '.join(repr(c) for c in choices)}"
            suggestion = did_you_mean(str(value), choices) if isinstance(value, str) else None
        elif etype in _EXPECTED:
            msg = f"{where}: expected {_EXPECTED[etype]}, got {_kind(value)}"
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                msg += f" {value!r}"
        elif etype == "tpenv":
            msg = f"{where}: {ctx.get('message', err['msg'])}"
        else:
            text = err["msg"]
            text = text.removeprefix("Value error, ")
            msg = f"{where}: {text[:1].lower()}{text[1:]}"
        # A dict key's own error (loc ends in "[key]") is shown at the key, not at its value.
        out.append(loc.problem(path, msg, suggestion, key=err["loc"][-1:] == ("[key]",)))
    return out
