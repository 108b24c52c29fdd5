"""Reading telepresence.yaml: YAML with positions → plain data → models, every problem located.

ruamel.yaml's round-trip loader keeps the line and column of every key and value.
We convert its tree to plain data (expanding ``${VAR}`` on the way) while indexing
those positions by path, validate with pydantic, and map each pydantic error's
``loc`` back to a position. Nothing stops at the first problem: the user gets
the whole list, and ConfigError (exit 2) carries it.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError

from tpenv import logs
from tpenv.config import checks
from tpenv.config.located import Locator, Path_, _kind, _problems_from, dotted
from tpenv.config.models import Config
from tpenv.config.telepresence import API_VERSION as WS_API_VERSION, is_workstation_state, translate
from tpenv.errors import ConfigError, Problem

_REF = re.compile(r"\$(\$?)\{([^}]*)(\}?)")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
log = logging.getLogger("tpenv.config")


# --- YAML → plain data --------------------------------------------------------------------------------------------

class _Converter:
    def __init__(self, loc: Locator, environ: Mapping[str, str]) -> None:
        self.loc, self.environ = loc, environ
        self.problems: list[Problem] = []
        self.memo: dict[int, Any] = {}  # aliases: convert a shared node once (and survive alias bombs)
        self.bad_paths: set[Path_] = set()  # values whose ${VAR} failed: pydantic's view of them would be noise

    def convert(self, node: Any, path: Path_) -> Any:
        if isinstance(node, (CommentedMap, CommentedSeq)):
            self.loc.containers.add(path)
            if id(node) in self.memo:
                return self.memo[id(node)]
        if isinstance(node, CommentedMap):
            out: dict[str, Any] = {}
            self.memo[id(node)] = out
            for k, v in node.items():
                kpos = _lc(node, "key", k)
                vpos = _lc(node, "value", k)
                if not isinstance(k, str):
                    line, col = kpos or (1, 1)
                    self.problems.append(Problem(self.loc.file, line, col,
                                                 f"{dotted(path)}: keys must be strings, got {_kind(k)} {k!r}"))
                    continue
                sub = (*path, k)
                if kpos:
                    self.loc.keys[sub] = kpos
                if vpos and v is not None:
                    self.loc.values[sub] = vpos
                out[k] = self.convert(v, sub)
            return out
        if isinstance(node, CommentedSeq):
            items: list[Any] = []
            self.memo[id(node)] = items
            for i, v in enumerate(node):
                pos = _lc(node, "item", i)
                if pos:
                    self.loc.values[(*path, i)] = pos
                items.append(self.convert(v, (*path, i)))
            return items
        if isinstance(node, TaggedScalar):
            return self.convert(node.value, path)
        if isinstance(node, bool):
            return bool(node)
        if isinstance(node, int):
            return int(node)
        if isinstance(node, float):
            return float(node)
        if isinstance(node, str):
            return self.expand(str(node), path)
        return node  # dates, None, binary: pydantic says what it expected instead

    def expand(self, text: str, path: Path_) -> str:
        def sub(m: re.Match[str]) -> str:
            escaped, body, closed = m.groups()
            if escaped:
                return "${" + body + closed  # $${X} is a literal ${X}
            name, sep, default = body.partition(":-")
            if not closed or not _VAR_NAME.fullmatch(name):
                self.bad_paths.add(path)
                self.problems.append(self.loc.problem(path, f"{dotted(path)}: malformed reference {m.group(0)!r}: "
                                                            "write ${NAME} or ${NAME:-default}"))
                return ""
            if self.environ.get(name):
                # The value may be a secret (a token on a handler's command line): it is never
                # logged, whatever later prints the expanded config.
                logs.secret(self.environ[name])
                return self.environ[name]
            if sep:
                return default
            if name in self.environ:
                return ""
            self.bad_paths.add(path)
            self.problems.append(self.loc.problem(
                path, f"{dotted(path)}: environment variable {name} is not set",
                f"set it, or give a default: ${{{name}:-default}}"))
            return ""
        return _REF.sub(sub, text) if "$" in text else text


def _lc(node: Any, kind: str, arg: Any) -> tuple[int, int] | None:
    try:
        line, col = getattr(node.lc, kind)(arg)
    except (KeyError, IndexError, TypeError, AttributeError):
        return None  # keys brought in by a `<<:` merge have no position of their own
    return (line + 1, col + 1)


# --- the entry point ----------------------------------------------------------------------------------------------

def _read(path: Path, file: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise ConfigError([Problem(file, 0, 0, "no such file")],
                          hint="create one with `tpenv init WORKLOAD`, or point at it with -f FILE") from e
    except IsADirectoryError as e:
        raise ConfigError([Problem(file, 0, 0, "is a directory, not a file")]) from e
    except OSError as e:
        raise ConfigError([Problem(file, 0, 0, f"cannot read: {e.strerror or e}")]) from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        before = raw[:e.start]
        line = before.count(b"\n") + 1
        col = e.start - (before.rfind(b"\n") + 1) + 1
        raise ConfigError([Problem(file, line, col, "the file is not UTF-8 text")]) from e


def _parse(text: str, file: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ruamel warns (reused anchors) on stderr; not our user's concern
            return YAML(typ="rt").load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = " ".join(p for p in (e.context, e.problem) if p) or "invalid YAML"
        raise ConfigError([Problem(file, line, col, f"invalid YAML: {what}")]) from e
    except ReaderError as e:
        before = text[:e.position]
        line, col = before.count("\n") + 1, e.position - (before.rfind("\n") + 1) + 1
        raise ConfigError([Problem(file, line, col, f"invalid YAML: {e.reason} (character {e.character!r})")]) from e
    except (YAMLError, RecursionError, ValueError, TypeError, AttributeError, IndexError) as e:
        # ruamel.yaml raises plain exceptions on some malformed input (e.g. `+_`, which its int
        # pattern matches and its int constructor then fails on); it is the edge, so wrap them,
        # at the scalar that fails when one can be found.
        line, col, value = _failing_scalar(text) or (1, 1, None)
        what = f"invalid YAML: {value!r} cannot be read as a value ({type(e).__name__}: {e}); quote it" \
            if value is not None else f"invalid YAML: {e}"
        raise ConfigError([Problem(file, line, col, what)]) from e


def _failing_scalar(text: str) -> tuple[int, int, str] | None:
    """(line, column, text) of the first plain scalar ruamel.yaml cannot construct, if any."""
    try:
        yaml = YAML(typ="rt")
        root = yaml.compose(text)
    except Exception:  # noqa: BLE001 - composing failed too: no position to give
        return None
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.value, list):
            for item in reversed(node.value):
                stack.extend(reversed(item) if isinstance(item, tuple) else [item])
            continue
        try:
            yaml.constructor.construct_object(node, deep=True)
        except Exception:  # noqa: BLE001 - the one we are looking for
            return node.start_mark.line + 1, node.start_mark.column + 1, node.value
    return None


def _document(path: Path, environ: Mapping[str, str]) -> tuple[dict[str, Any], Locator, list[Problem], list[Problem], set]:
    """(data in tpenv's shape, its positions, problems so far, notes, paths whose ${VAR} failed).
    Notes are only ever made for a WorkstationState manifest (and always, for one: its header)."""
    file = str(path)
    text = _read(path, file)
    tree = _parse(text, file)

    loc = Locator(file)
    conv = _Converter(loc, environ)
    if isinstance(tree, CommentedMap):
        loc.values[()] = (tree.lc.line + 1, tree.lc.col + 1)
    try:
        data = conv.convert(tree, ())
    except RecursionError as e:
        raise ConfigError([Problem(file, 1, 1, "the document is nested too deeply")]) from e
    problems = list(conv.problems)
    if data is None:
        data = {}  # an empty file is a valid file that asks for nothing
    if not isinstance(data, dict):
        raise ConfigError([*problems, loc.problem((), f"expected a mapping at the top level, got {_kind(data)}")])
    notes: list[Problem] = []
    if is_workstation_state(data):  # Telepresence's `apply -f` format: read as the same intercepts
        data, loc, refused, notes = translate(data, loc)
        problems += refused
    return data, loc, problems, notes, conv.bad_paths


def _is_workstation_state_file(path: Path, environ: Mapping[str, str]) -> bool:
    text = _read(path, str(path))
    tree = _parse(text, str(path))
    return isinstance(tree, CommentedMap) and is_workstation_state({"kind": tree.get("kind")})


def translated_workstation_state(path: str | Path, environ: Mapping[str, str] | None = None
                                 ) -> tuple[dict[str, Any], list[Problem]]:
    """A WorkstationState manifest as telepresence.yaml data (`tpenv init --from-telepresence`),
    with the notes on the fields it ignores (located; the caller shows them: never dropped silently)."""
    path = Path(path)
    environ = os.environ if environ is None else environ
    if not _is_workstation_state_file(path, environ):
        raise ConfigError([Problem(str(path), 1, 1, "not a Telepresence manifest: expected kind: WorkstationState "
                                                    f"(apiVersion: {WS_API_VERSION})")])
    data, _, problems, notes, _ = _document(path, environ)
    if problems:
        raise ConfigError(sorted(set(problems), key=lambda p: (p.line, p.column, p.message)))
    return data, notes


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate a telepresence.yaml; ConfigError lists every problem with file:line:column."""
    path = Path(path)
    file = str(path)
    data, loc, problems, notes, bad_paths = _document(path, os.environ if environ is None else environ)
    for note in notes:
        log.warning("%s", note)

    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        problems += _problems_from(e, data, loc, bad_paths)
    except RecursionError as e:  # cyclic aliases (&a [*a])
        raise ConfigError([Problem(file, 1, 1, "the document refers to itself (recursive alias)")]) from e
    problems += checks.check(data, loc, path.parent)

    if problems:
        raise ConfigError(sorted(set(problems), key=lambda p: (p.line, p.column, p.message)),
                          hint="`tpenv schema` prints every key the file may have")
    assert config is not None
    config._source = path.resolve()
    config._locator = loc
    config._notes = notes
    for i, ic in enumerate(config.intercepts):
        for name in ic.env.rewrite:
            line, col = loc.at(("intercepts", i, "env", "rewrite", name))
            ic.env._where[name] = (file, line, col)
    return config


__all__ = ["load_config", "translated_workstation_state", "Locator", "dotted"]
