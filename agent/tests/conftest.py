"""Shared fixtures for the agent's tests: golden cases, YAML in and out, ``--update-golden``.

Golden cases are handed to tests through fixtures (``golden_ok_case``, ``golden_error_case``,
``golden_case``: a case directory) rather than imports, so this conftest never collides with
another ``conftest`` module in the same run. YAML is a test-time need only (ruamel.yaml ships
with the client, never in the agent image).
"""
from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from ruamel.yaml import YAML

GOLDEN = Path(__file__).parent / "golden"

# The settings every golden case uses unless its args.yaml overrides them.
GOLDEN_SETTINGS = {"agent_image": "tpenv/agent:golden", "image_pull_policy": "Never", "lease": 5, "redirect": False}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite agent/tests/golden/*/expected-* from the current code (review the diff)")


def _load(path: Path):
    return YAML(typ="safe", pure=True).load(path.read_text())


def _dump(data) -> str:
    # Round-trip dumper: keeps key order, so "restored exactly" includes the order of keys.
    # Aliases stay on: an anchor in a golden file would reveal objects shared between containers.
    out = io.StringIO()
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.dump(data, out)
    return out.getvalue()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cases = sorted(p for p in GOLDEN.iterdir() if (p / "workload.yaml").exists())
    errors = [p for p in cases if p.name.startswith("error-")]
    groups = {"golden_case": cases, "golden_error_case": errors,
              "golden_ok_case": [p for p in cases if p not in errors]}
    for name, paths in groups.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, paths, ids=[p.name for p in paths])


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> SimpleNamespace:
    """Helpers: ``load(path)``, ``dump(obj)``, ``settings``, ``update`` (the --update-golden switch)."""
    return SimpleNamespace(load=_load, dump=_dump, settings=dict(GOLDEN_SETTINGS),
                           update=bool(request.config.getoption("--update-golden")))
