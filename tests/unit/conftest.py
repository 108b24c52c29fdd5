"""Fixtures shared by the unit tests of bench/ (its load tasks and its server)."""
from __future__ import annotations

import pytest


@pytest.fixture
def served():
    """bench/server.py on 127.0.0.1 (the bench's own LocalServer), a port of its own choosing; its port."""
    from bench.processes import LocalServer  # here, not at collection: it loads the bench's cluster kit

    server = LocalServer()
    try:
        yield server.port
    finally:
        server.stop()
