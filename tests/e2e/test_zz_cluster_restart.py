"""`cluster down` then `cluster up` gives a working cluster again (issue 2, "Done when" 6).

The plugin runs test_zz_* files last: this test takes the whole cluster away. It leaves
the cluster up again, even when it fails half-way. Only meaningful for the local
cluster: against an external KUBECONFIG there is nothing of ours to stop.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.cluster.pytest_plugin import (TEST_LABEL, _cluster_cli, apply, cluster_command, kubectl, kubectl_json,
                                         live_pods, wait_until)
from tests.kit.apps import testapp_image

pytestmark = pytest.mark.e2e

TESTAPP = testapp_image()


def _local(kubeconfig: Path) -> bool:
    return Path(kubeconfig) == _cluster_cli.kubeconfig_path()


DAEMONS = {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "coredns"}


def _cluster_daemons() -> list[str]:
    """Command lines of the cluster's daemons (and containerd and its shims for our socket) still running.

    kubectl is left out on purpose: other sessions on this machine may be running it.
    """
    bin_root = str(_cluster_cli.build.cache_root() / "bin")
    state = str(_cluster_cli.state_dir())
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = [a.decode(errors="replace") for a in cmdline.read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if not args:
            continue
        text = " ".join(args)
        ours = (args[0].startswith(bin_root) and Path(args[0]).name in DAEMONS) or \
            ("containerd" in Path(args[0]).name and state in text)
        if ours:
            found.append(text[:160])
    return found


def test_cluster_down_then_up_gives_a_working_cluster(kubeconfig, namespace):
    if not _local(kubeconfig):
        pytest.skip("down/up only applies to the local cluster, not to the one given by KUBECONFIG")
    ns = namespace

    # Stage 1: a workload that must survive the restart (it lives in etcd, its pods do not).
    apply([
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo"},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "echo"}},
                  "template": {"metadata": {"labels": {"app": "echo"}},
                               "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                                   "name": "echo", "image": TESTAPP, "imagePullPolicy": "Never",
                                   "command": ["tpenv-echo"], "ports": [{"containerPort": 8080}]}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
         "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]}},
    ], ns=ns)
    kubectl("rollout", "status", "deployment/echo", "--timeout=120s", ns=ns, timeout=150)

    try:
        # Stage 2: down stops every daemon and removes what it added to the host.
        assert cluster_command("down") == 0
        assert _cluster_daemons() == []
        assert cluster_command("status") != 0
        routes = subprocess.run(["ip", "route", "show", "type", "unreachable"], capture_output=True,
                                text=True).stdout
        assert "10.96.0.0/16" not in routes and "10.244.0.0/16" not in routes
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
        assert not [r for r in rules.splitlines() if "KUBE-" in r or "CNI-" in r or "TPENV-" in r]
        assert subprocess.run(["ip", "link", "show", "cni0"], capture_output=True).returncode != 0
        assert not [m for m in Path("/proc/self/mounts").read_text().splitlines()
                    if str(_cluster_cli.state_dir() / "kubelet") in m]
    finally:
        # Stage 3: up again (also when stage 2 failed: later runs need a cluster).
        assert cluster_command("up") == 0
    assert cluster_command("status") == 0

    # Stage 4: the workload from before runs again and its Service answers by name from a new pod.
    kubectl("rollout", "status", "deployment/echo", "--timeout=120s", ns=ns, timeout=150)
    apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
           "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
               "name": "main", "image": TESTAPP, "imagePullPolicy": "Never", "command": ["sleep", "infinity"]}]}},
          ns=ns)
    kubectl("wait", "--for=condition=Ready", "pod/client", "--timeout=120s", ns=ns, timeout=150)
    pods = {p["metadata"]["name"] for p in live_pods(ns, "app=echo")}

    def answer():
        out = kubectl("exec", "client", "--", "curl", "-sSf", "--max-time", "5", f"http://echo.{ns}/", ns=ns,
                      check=False)
        return out.returncode == 0 and out.stdout

    body = wait_until(f"http://echo.{ns}/ after the restart", answer, timeout=60)
    assert any(p in body for p in pods), body
    assert kubectl_json("get", "ns", ns)["metadata"]["labels"][TEST_LABEL] == "true"
