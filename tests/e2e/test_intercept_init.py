"""tpenv init: a starter telepresence.yaml for an existing workload; it loads, and is never overwritten."""
from __future__ import annotations

import pytest

from test_intercept_kit import deploy_hello, tpenv
from tpenv.config import load_config
from tpenv.engine.contexts import resolve_targets
from tpenv.kits.kubeconfig import Kubeconfig

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_init_writes_a_valid_starter_and_refuses_to_overwrite(namespace, tmp_path):
    ns = namespace
    deploy_hello(ns)
    # Stage 1: written from the cluster's objects: namespace, kind/name, Service port, command.
    cp = tpenv(tmp_path, "init", "hello", "-n", ns)
    wrote, *rest = cp.stdout.strip().splitlines()
    assert wrote == "wrote telepresence.yaml: intercept hello (deployment/hello, port 8080:80)"
    # The env file holds the pod's secrets: init suggests a .gitignore line for it (no volumes, no mount).
    assert rest == ["add to .gitignore (the env file holds secrets; the volumes are the cluster's): /hello.env"]
    config = load_config(tmp_path / "telepresence.yaml")
    assert config.namespace == ns
    (ic,) = config.intercepts
    assert (ic.name, ic.workload, str(ic.port)) == ("hello", "deployment/hello", "8080:80")
    assert ic.run is not None and ic.run.command == ["tpenv-echo"]
    assert ic.mount.path is False and ic.env.file == "hello.env"
    # The cluster is named by its API server URL, which finds the current context (issue 20).
    ((name, entry),) = config.contexts.items()
    current = Kubeconfig.read().get(Kubeconfig.read().current)
    assert entry.server == current.server and resolve_targets(config).named[name].kube_context == current.name
    # Stage 2: a second run refuses and leaves the file as it was.
    text = (tmp_path / "telepresence.yaml").read_text()
    cp = tpenv(tmp_path, "init", "hello", "-n", ns, check=False)
    assert cp.returncode == 2 and "never overwrites" in cp.stderr
    assert (tmp_path / "telepresence.yaml").read_text() == text
    # Stage 3: a workload that does not exist writes nothing.
    cp = tpenv(tmp_path, "-f", "other.yaml", "init", "nosuch", "-n", ns, check=False)
    assert cp.returncode == 1 and not (tmp_path / "other.yaml").exists()
