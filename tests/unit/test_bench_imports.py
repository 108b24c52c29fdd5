"""bench/ and the tests share code only through plain modules (tests/kit/, tests/cluster's build
tooling), never a test module or the pytest plugin: a test's edit must not break the bench, and
the bench's needs stay visible in one place (issue 14)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
    return names


def is_test_module(module: str) -> bool:
    parts = module.split(".")
    return parts[-1].startswith("test_") or "pytest_plugin" in parts or "conftest" in parts


def test_bench_imports_no_test_module():
    offenders = [f"{p.relative_to(REPO)}: {m}" for p in sorted((REPO / "bench").glob("*.py"))
                 for m in imported_modules(p) if is_test_module(m)]
    assert offenders == [], "bench imports test modules (move what it needs to tests/kit/):\n" + "\n".join(offenders)


def test_no_test_loads_the_bench_runner():
    # The smoke test runs bench/run.py as a process; its list of rows comes from bench/rows.py.
    offenders = [str(p.relative_to(REPO)) for p in sorted((REPO / "tests").rglob("*.py"))
                 if p != Path(__file__).resolve() and "spec_from_file_location" in (text := p.read_text())
                 and '"bench"' in text and '"run.py"' in text]
    assert offenders == [], offenders
