"""Issue 13, sshfs mode: the mount caches what a listing brought (a stat of every listed file
costs no round trip to the pod), and a change made in the pod still shows up locally within the
documented bound: twice ``mounts.cache_seconds`` plus 1 s (sshfs's directory cache, counted
in whole seconds, then the kernel's attribute cache), 3 s at the default.

The store app of test_intercept_env_mount (an emptyDir with a file the app wrote at start).
"""
from __future__ import annotations

import os
import time

import pytest

from test_intercept_env_mount import store_app
from test_intercept_kit import Intercepting
from tests.cluster.pytest_plugin import kubectl
from tpenv.settings import MountSettings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

BOUND = 2 * MountSettings().cache_seconds + 1  # sshfs counts its cache in whole seconds: up to 1 s more


def test_a_change_in_the_pod_shows_up_within_the_cache_bound(namespace, tmp_path):
    ns = namespace
    store_app(ns)
    vol = tmp_path / "store.vol"
    run = Intercepting(tmp_path, "store", "--port", "18485:web", "-n", ns, "--mount", str(vol))
    try:
        info = run.ready()
        pod = info["pods"][0]
        data = vol / "data"
        # Stage 1: a file made in the pod after the mount is there within the bound; then a list and
        # a stat put the names and attributes in both caches.
        kubectl("exec", pod, "-c", "app", "--", "sh", "-c", "echo gone > /data/gone.txt", ns=ns)
        time.sleep(BOUND + 0.2)  # why a sleep: see stage 2
        assert {"cluster.txt", "gone.txt"} <= set(os.listdir(data))
        before = os.stat(data / "cluster.txt").st_size
        assert before == len("written in the cluster\n")
        assert not (data / "new.txt").exists()

        # Stage 2: the pod creates one file, grows another and removes the third.
        kubectl("exec", pod, "-c", "app", "--", "sh", "-c", "echo new > /data/new.txt; "
                "echo more >> /data/cluster.txt; rm /data/gone.txt", ns=ns)
        # The claim is about time: wait the bound once (the changes are done when exec returned),
        # then everything must be visible; a longer cache (sshfs's default is 20 s) fails here.
        time.sleep(BOUND + 0.2)
        names = os.listdir(data)
        assert "new.txt" in names and "gone.txt" not in names
        assert (data / "new.txt").read_text() == "new\n"
        assert os.stat(data / "cluster.txt").st_size == before + len("more\n")
        assert (data / "cluster.txt").read_text() == "written in the cluster\nmore\n"
        assert not (data / "gone.txt").exists()
    finally:
        assert run.stop() == 0, "".join(run.stderr)
