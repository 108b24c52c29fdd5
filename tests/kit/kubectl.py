"""The kubectl of the test cluster, for tests and benchmarks alike (no pytest here).

    kubectl(*args, ns=None, input=None, check=True, timeout=120) -> CompletedProcess (text)
    kubectl_json(*args, ns=None) -> dict                 `kubectl ... -o json`, parsed
    live_pods(ns, selector) -> list[dict]                the selected pods not being deleted
    apply(obj_or_list, ns=None)                          `kubectl apply -f -` of dicts
    kubectl_binary() -> str                              the kubectl built for the local cluster

The cluster is $KUBECONFIG when set, else the local one `python3 devspace.py cluster up` made.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

_CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"
if str(_CLUSTER_DIR) not in sys.path:
    sys.path.insert(0, str(_CLUSTER_DIR))

import build as _build  # noqa: E402  (tests/cluster/build.py)
import cli as _cluster_cli  # noqa: E402  (tests/cluster/cli.py)

TEST_LABEL = "tpenv.io/test"


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"kubectl {' '.join(self.cmd[1:])} failed (exit {self.returncode}):\n{(self.stderr or '').strip()}"


def _kubeconfig_env() -> str:
    kc = os.environ.get("KUBECONFIG")
    return kc if kc else str(_cluster_cli.kubeconfig_path())


def kubectl_binary() -> str:
    """The kubectl we built for the local cluster; for an external cluster, the one on PATH if any."""
    built = _build.kubectl_bin()
    local = _kubeconfig_env() == str(_cluster_cli.kubeconfig_path())
    if local and built.exists():
        return str(built)
    return shutil.which("kubectl") or str(built)


def kubectl(*args: str, ns: str | None = None, input: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """Run kubectl against the test cluster; on failure the exception carries its stderr."""
    cmd = [kubectl_binary(), *(["-n", ns] if ns else []), *map(str, args)]
    env = dict(os.environ, KUBECONFIG=_kubeconfig_env())
    cp = subprocess.run(cmd, input=input, capture_output=True, text=True, env=env, timeout=timeout)
    if check and cp.returncode != 0:
        raise KubectlError(cp.returncode, cmd, cp.stdout, cp.stderr)
    return cp


def kubectl_json(*args: str, ns: str | None = None) -> Any:
    return json.loads(kubectl(*args, "-o", "json", ns=ns).stdout)


def live_pods(ns: str, selector: str) -> list[dict]:
    """The pods ``selector`` matches in ``ns``, less those being deleted: a rollout's old pods stay
    listed (phase Running) through their grace period."""
    return [p for p in kubectl_json("get", "pods", "-l", selector, ns=ns)["items"]
            if not p["metadata"].get("deletionTimestamp")]


def apply(obj: dict | list, ns: str | None = None) -> subprocess.CompletedProcess:
    items = obj if isinstance(obj, list) else [obj]
    doc = {"apiVersion": "v1", "kind": "List", "items": items}
    return kubectl("apply", "-f", "-", ns=ns, input=json.dumps(doc))
