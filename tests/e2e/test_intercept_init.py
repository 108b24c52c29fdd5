"""tpenv init: a starter telepresence.yaml for an existing workload; it loads, and is never overwritten."""
from __future__ import annotations

import pytest

from test_intercept_kit import deploy_hello, tpenv
from tests.cluster.pytest_plugin import apply
from tests.kit.apps import testapp_image
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
    # The env file sits in the watched directory: its comment says why run.watch does not trip on it.
    text = (tmp_path / "telepresence.yaml").read_text()
    env_line = next(line for line in text.splitlines() if line.strip().startswith("env:"))
    assert "keep it out of git" in env_line and "run.watch skips it (tpenv's own output)" in env_line, text
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


def test_init_comments_the_mount_for_either_mode(namespace, tmp_path):
    # Stage 1: a workload with a volume (init reads it and its Service; no rollout needed).
    ns = namespace
    labels = {"app": "cart"}
    apply([{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "cart"},
            "spec": {"replicas": 0, "selector": {"matchLabels": labels}, "template": {
                "metadata": {"labels": labels}, "spec": {
                    "volumes": [{"name": "data", "emptyDir": {}}],
                    "containers": [{"name": "app", "image": testapp_image(), "imagePullPolicy": "Never",
                                    "ports": [{"name": "http", "containerPort": 8080}],
                                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}}}},
           {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "cart"},
            "spec": {"selector": labels, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}}], ns=ns)
    # Stage 2: the mount line says what it holds in either mode, and that run.watch never enters it.
    cp = tpenv(tmp_path, "init", "cart", "-n", ns)
    assert "/cart.env /cart.vol/" in cp.stdout, cp.stdout
    text = (tmp_path / "telepresence.yaml").read_text()
    (mount_line,) = [line for line in text.splitlines() if line.strip().startswith("mount:")]
    assert mount_line.split("#")[0].strip() == "mount: ./cart.vol", text
    comment = mount_line.split("#", 1)[1]
    assert "(sshfs, or a copy with mount.mode: sync)" in comment and "run.watch never enters it" in comment, text
