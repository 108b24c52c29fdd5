"""pytest plugin: the cluster for e2e tests, a namespace per test, and a kubectl helper.

Fixtures
    kubeconfig  (session)  Path of a kubeconfig: $KUBECONFIG when set to another cluster (kind,
                           k3s, cloud), else the local cluster, brought up by `cluster up`.
                           Sets $KUBECONFIG for the rest of the session so subprocesses
                           and the kubernetes client see the same cluster.
    namespace   (function) A fresh namespace `t-<test name>-<random>`, labelled
                           tpenv.io/test=true, with its default ServiceAccount ready;
                           deleted after the test without waiting.
    kubectl     (function) the `kubectl` helper below, after the cluster is up.

Helpers, importable by any test (``from tests.cluster.pytest_plugin import kubectl``):
    kubectl(*args, ns=None, input=None, check=True, timeout=120) -> CompletedProcess (text)
    kubectl_json(*args, ns=None) -> dict                 `kubectl ... -o json`, parsed
    live_pods(ns, selector) -> list[dict]                the selected pods not being deleted
    apply(obj_or_list, ns=None)                          `kubectl apply -f -` of dicts
    wait_until(what, fn, timeout=60, interval=0.5)       poll fn() until truthy, return it
"""
from __future__ import annotations

import os
import random
import re
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

_CLUSTER_DIR = Path(__file__).resolve().parent
if str(_CLUSTER_DIR) not in sys.path:
    sys.path.insert(0, str(_CLUSTER_DIR))

import cli as _cluster_cli  # noqa: E402  (tests/cluster/cli.py)

# The kubectl helpers live in a plain module the benchmarks import too (tests/kit/kubectl.py);
# tests keep importing them from here.
from tests.kit.kubectl import (TEST_LABEL, KubectlError, _kubeconfig_env, apply, kubectl,  # noqa: E402,F401
                               kubectl_binary, kubectl_json, live_pods)

def wait_until(what: str, fn: Callable[[], Any], timeout: float = 60, interval: float = 0.5) -> Any:
    """Poll ``fn`` until it returns something truthy; fail the test with ``what`` and the last error."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = fn()
            if result:
                return result
            last = result
        except Exception as e:  # noqa: BLE001 - retried; shown if it never succeeds
            last = e
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})", pytrace=False)


def cluster_command(*args: str) -> int:
    """`cluster up|down|status` in a child process (as a user would type it), output to the terminal.

    A child, not an in-process call: the daemons it starts are not our children then, and
    outlive the test session cleanly.
    """
    return subprocess.run([sys.executable, str(_CLUSTER_DIR / "cli.py"), *args]).returncode


# ---------------------------------------------------------------- fixtures

def pytest_collection_modifyitems(session, config, items):
    """Tests in test_zz_*.py files (the cluster down/up test) run after everything else,
    whatever the order of testpaths: they take the cluster away for a while."""
    items.sort(key=lambda item: Path(str(item.fspath)).name.startswith("test_zz_"))


@pytest.fixture(scope="session")
def kubeconfig() -> Path:
    given = os.environ.get("KUBECONFIG")
    local = _cluster_cli.kubeconfig_path()
    if given and Path(given.split(os.pathsep)[0]) != local:
        return Path(given.split(os.pathsep)[0])
    # The local cluster: `up` is idempotent (about a second when it runs) and repairs a cluster
    # someone took down since.
    rc = cluster_command("up")
    if rc != 0:
        pytest.fail(f"the local cluster did not come up (`cluster up` exit {rc}); see the `cluster:` lines "
                    f"above, `python3 devspace.py cluster status` and {_cluster_cli.state_dir() / 'logs'}",
                    pytrace=False)
    os.environ["KUBECONFIG"] = str(local)
    return local


def _slug(text: str, size: int) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:size].strip("-") or "x"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, kubeconfig: Path) -> str:
    suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
    name = f"t-{_slug(request.node.name.removeprefix('test_'), 63 - 3 - len(suffix) - 1)}-{suffix}"
    apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {TEST_LABEL: "true"}}})
    # Pods are refused until the controller-manager has made the namespace's default ServiceAccount.
    wait_until(f"ServiceAccount default in {name}",
               lambda: kubectl("get", "serviceaccount", "default", ns=name, check=False).returncode == 0, 30)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture(name="kubectl")
def kubectl_fixture(kubeconfig: Path) -> Callable[..., subprocess.CompletedProcess]:
    return kubectl
