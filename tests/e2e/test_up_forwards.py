"""`tpenv up` forwards: a two-replica Service stays reachable on a local port while the pod in
use is deleted (issue 6, done-when 4). Runs the real CLI against the real cluster."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.cluster.pytest_plugin import kubectl, wait_until
from tests.e2e.helpers_up import TpenvProcess, free_port, http_json
from tests.e2e.test_up_kit import deploy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_forward_moves_to_another_pod_when_its_pod_is_deleted(namespace, tmp_path):
    # -- stage 1: a two-replica echo Service, and a telepresence.yaml forwarding it ---------------
    deploy("db", namespace, replicas=2)
    local = free_port()
    (tmp_path / "telepresence.yaml").write_text(
        f"apiVersion: tpenv/v1\nnamespace: {namespace}\n"
        f"forwards:\n  - service: db\n    port: 80\n    local: {local}\n")
    url = f"http://127.0.0.1:{local}/"

    with TpenvProcess("up", cwd=tmp_path) as up:
        # -- stage 2: the forward answers from one of the pods ----------------------------------
        first = wait_until(f"the forward on {url}\n{up.output}", lambda: http_json(url), 60)
        assert first["source"] == "cluster"
        in_use = first["pod"]
        assert all(http_json(url)["pod"] == in_use for _ in range(5))  # one pod at a time

        # -- stage 3: delete that pod; once its endpoint is gone, every new connection works ---
        kubectl("delete", "pod", in_use, "--wait=false", ns=namespace)
        wait_until(f"{in_use} to leave the endpoints",
                   lambda: in_use not in kubectl("get", "endpointslices", "-l", "kubernetes.io/service-name=db",
                                                 "-o", "jsonpath={..targetRef.name}", ns=namespace).stdout, 60)
        answers = [http_json(url) for _ in range(20)]
        assert {a["pod"] for a in answers} and in_use not in {a["pod"] for a in answers}, answers

        # -- stage 4: `tpenv status` from another shell shows the forward ready ------------------
        status = subprocess.run([up.cmd[0], "status", "-o", "json"], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        # This test's session: another `tpenv up` on the machine (a developer's, a demo) is listed too.
        ours = [x for x in json.loads(status.stdout)["sessions"]
                if x["session"]["config"] == str((tmp_path / "telepresence.yaml").resolve())]
        assert len(ours) == 1, status.stdout
        units = ours[0]["units"]
        assert [(u["name"], u["state"]) for u in units if u["name"].startswith("forward")] == \
            [(f"forward/{namespace}/db/80", "ready")]

        # -- stage 5: SIGTERM ends the session cleanly and frees the port ----------------------
        assert up.stop() == 0, up.output
    with pytest.raises(OSError):
        http_json(url, timeout=2)
