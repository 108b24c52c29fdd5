"""Issue 5, sync mode: the app's volumes as a local copy kept in step with the pod (no FUSE used).

The store app of test_intercept_env_mount (an emptyDir the app writes a file into at start, a
projected token at the path an env variable names). A long-running `tpenv intercept ...
--mount DIR --mount-mode sync`: the copy has the cluster's file when the intercept is ready, a
local write shows up in the pod, a write in the pod shows up locally, TELEPRESENCE_ROOT and
the rewritten token variable point into the copy; a last local write before Ctrl-C reaches the
pod, and the copy stays in the directory given.
"""
from __future__ import annotations

import json

import pytest

from test_intercept_env_mount import TOKEN_DIR, store_app
from test_intercept_kit import Intercepting, wait_for
from tests.cluster.pytest_plugin import kubectl

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def pod_cat(ns: str, pod: str, path: str) -> str:
    cp = kubectl("exec", pod, "-c", "app", "--", "cat", path, ns=ns, check=False)
    return cp.stdout if cp.returncode == 0 else ""


def test_sync_mode_copies_and_keeps_both_sides_in_step(namespace, tmp_path):
    ns = namespace
    store_app(ns)
    vol = tmp_path / "store.vol"
    run = Intercepting(tmp_path, "store", "--port", "18383:web", "-n", ns, "--mount", str(vol), "--mount-mode", "sync",
                       "--env-file", "store.env", "--env-syntax", "json",
                       "--rewrite-env", "AWS_WEB_IDENTITY_TOKEN_FILE")
    try:
        # Stage 1: ready means copied: the file the app wrote in the cluster is here, no FUSE mount.
        info = run.ready()
        assert info["mount_point"] == str(vol)
        assert (vol / "data" / "cluster.txt").read_text() == "written in the cluster\n"
        assert str(vol) not in open("/proc/self/mountinfo").read()

        # Stage 2: the env points into the copy; the rewritten token path opens locally (a JWT).
        env = json.loads((tmp_path / "store.env").read_text())
        assert env["TELEPRESENCE_ROOT"] == str(vol)
        assert env["AWS_WEB_IDENTITY_TOKEN_FILE"] == f"{vol}{TOKEN_DIR}/token"
        assert open(env["AWS_WEB_IDENTITY_TOKEN_FILE"]).read().count(".") == 2
        assert set(env["TELEPRESENCE_MOUNTS"].split(":")) >= {"/data", TOKEN_DIR}

        # Stage 3: a local write shows up in the pod.
        pod = info["pods"][0]  # the replica with the agent (the one before injection may still be terminating)
        (vol / "data" / "laptop.txt").write_text("written on the laptop\n")
        wait_for("the laptop's file in the pod",
                 lambda: pod_cat(ns, pod, "/data/laptop.txt") == "written on the laptop\n", 30)

        # Stage 4: a write in the pod shows up here; a delete in the pod deletes here.
        kubectl("exec", pod, "-c", "app", "--", "sh", "-c", "echo written later in the pod > /data/pod.txt; "
                "rm /data/cluster.txt", ns=ns)
        wait_for("the pod's file here", lambda: (vol / "data" / "pod.txt").exists()
                 and (vol / "data" / "pod.txt").read_text() == "written later in the pod\n", 30)
        wait_for("the pod's delete here", lambda: not (vol / "data" / "cluster.txt").exists(), 30)

        # Stage 5: a last write just before Ctrl-C reaches the pod (stop flushes).
        (vol / "data" / "last.txt").write_text("just before stop\n")
    finally:
        assert run.stop() == 0, "".join(run.stderr)
    assert pod_cat(ns, pod, "/data/last.txt") == "just before stop\n"
    # The directory was given: the copy stays.
    assert (vol / "data" / "pod.txt").read_text() == "written later in the pod\n"
