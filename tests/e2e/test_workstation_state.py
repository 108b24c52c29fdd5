"""A Telepresence 2.31 WorkstationState manifest (the `telepresence apply -f` format, written
from its documentation) under `tpenv up -f`: the same intercept effect as telepresence.yaml
(the cluster's traffic reaches the handler the manifest's `command` starts); an unsupported
field is refused at its line, before anything in the cluster changes."""
from __future__ import annotations

import subprocess

import pytest

from tests.cluster.pytest_plugin import kubectl_json
from tests.e2e.helpers_up import TPENV, free_port
from tests.e2e.test_up_kit import (UpSession, answered_by_cluster, answered_by_laptop, client, deploy, wait_client,
                                   write_handler)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def manifest(ns: str, port: int, extra: str = "") -> str:
    return ("apiVersion: telepresence.io/v1alpha1\n"
            "kind: WorkstationState\n"
            "connection:\n"
            "  name: dev\n"
            f"  namespace: {ns}\n"
            "attachments:\n"
            "  - type: intercept\n"
            "    name: alpha\n"
            f"    ports: [\"{port}:web\"]\n"
            "    env:\n"
            "      file: alpha.env\n"
            "    mount:\n"
            "      enabled: false\n"
            f"    command: [env, PORT={port}, NAME=alpha, python3, server.py]\n" + extra)


def test_workstation_state_under_up(namespace, tmp_path):
    ns = namespace
    # Stage 1: the echo workload, a client pod, the handler the manifest's command runs.
    deploy("alpha", ns, wait=False)
    client(ns)
    deploy("alpha", ns)
    wait_client(ns)
    write_handler(tmp_path)
    port = free_port()
    url = f"http://alpha.{ns}/"

    # Stage 2: an unsupported field is refused at its line and nothing is touched.
    (tmp_path / "bad.yaml").write_text(manifest(ns, port, "    toPod: [\"5432\"]\n"))
    before = kubectl_json("get", "deployment", "alpha", ns=ns)["metadata"]["generation"]
    cp = subprocess.run([TPENV, "up", "-f", "bad.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert cp.returncode == 2
    assert "bad.yaml:15:5: WorkstationState: toPod is not supported" in cp.stderr, cp.stderr
    assert kubectl_json("get", "deployment", "alpha", ns=ns)["metadata"]["generation"] == before

    # Stage 3: the manifest as Telepresence users write it: the cluster's traffic reaches the handler.
    (tmp_path / "dev.yaml").write_text(manifest(ns, port))
    with UpSession(tmp_path, "-f", "dev.yaml") as up:
        up.wait_ready(f"intercept/{ns}/alpha", "handler/alpha")
        answer = up.until("alpha from the laptop", answered_by_laptop(ns, url, name="alpha"), 90)
        assert answer["cluster_env"], "the handler gets the app's environment"
        assert "connection.name is ignored" in up.output  # the harmless field, noted at its line
        assert (tmp_path / "alpha.env").is_file()
    # Stage 4: the session ended: the cluster answers again.
    up.until("alpha from the cluster", answered_by_cluster(ns, url), 60)
