"""Suite-wide pytest setup: the cluster fixtures (kubeconfig, namespace, kubectl) for every test.

The repo root goes on sys.path so tests can write ``from tests.cluster.pytest_plugin import kubectl``
however pytest was started.
"""
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest_plugins = ["tests.cluster.pytest_plugin"]
