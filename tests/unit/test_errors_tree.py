"""One exception tree: every exception class defined in tpenv/ derives from tpenv.errors.TpenvError
and stands in the drawing of tpenv/errors.py's docstring, under the parent it really has.

The drawing is what a newcomer reads to learn which errors exist and whether each is retried
(TransientError) or not (PermanentError); a class left out of it, or drawn under the wrong
parent, sends them the wrong way.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import tpenv
from tpenv import errors

# A row of the drawing: the tree's guides ("│   ", "├── ", "└── "), then a class name.
ROW = re.compile(r"^    (?P<guides>(?:[│ ]   )*)(?:[├└]── )?(?P<name>[A-Z]\w+)\b")


def drawn_parents() -> dict[str, str | None]:
    """class name -> its parent's name in the docstring's drawing (None for the root)."""
    parents: dict[str, str | None] = {}
    stack: list[str] = []  # the names on the path to the current row, by depth
    for line in (errors.__doc__ or "").splitlines():
        row = ROW.match(line)
        if row is None or not (row["name"] == "TpenvError" or stack):
            continue
        depth = len(row["guides"]) // 4 + (0 if row["name"] == "TpenvError" else 1)
        del stack[depth:]
        parents[row["name"]] = stack[-1] if stack else None
        stack.append(row["name"])
    return parents


def tpenv_exception_classes() -> list[type[BaseException]]:
    # Stage 1: import every module of the package, so every class it defines exists.
    found = []
    for info in pkgutil.walk_packages(tpenv.__path__, "tpenv."):
        module = importlib.import_module(info.name)
        # Stage 2: keep the exception classes the module itself defines (not the ones it imports).
        found += [obj for obj in vars(module).values()
                  if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name]
    return found


def test_the_drawing_is_read_whole():
    # The parser itself: the documented roots and a nested row come out with their parents.
    parents = drawn_parents()
    assert parents["TpenvError"] is None
    assert parents["PermanentError"] == "TpenvError" and parents["NotFound"] == "PermanentError"
    assert parents["UpdateConflict"] == "TransientError"


def test_every_exception_class_in_tpenv_is_in_the_tree_and_drawn_under_its_parent():
    parents = drawn_parents()
    classes = tpenv_exception_classes()
    assert len(classes) > 10, "the walk found too few exception classes: is the package importable?"
    outside = [f"{c.__module__}.{c.__name__}" for c in classes if not issubclass(c, errors.TpenvError)]
    assert not outside, f"exception classes outside tpenv.errors.TpenvError's tree: {outside}"
    undrawn = [f"{c.__module__}.{c.__name__}" for c in classes if c.__name__ not in parents]
    assert not undrawn, f"exception classes missing from tpenv/errors.py's drawing: {undrawn}"
    misplaced = {c.__name__: (parents[c.__name__], c.__bases__[0].__name__) for c in classes
                 if c is not errors.TpenvError and parents[c.__name__] != c.__bases__[0].__name__}
    assert not misplaced, f"drawn under the wrong parent (drawn, real): {misplaced}"
