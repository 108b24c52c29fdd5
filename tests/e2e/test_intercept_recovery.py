"""Recovery: a replica deleted during an intercept; the new pod's agent gets the intercept, by itself.

The pod watch adds the new pod to the desired set; the reconciler opens a tunnel to it and
registers the intercept there, and forgets the dead pod's tunnel. No restart of tpenv.
"""
from __future__ import annotations

import pytest

from test_intercept_kit import Intercepting, LocalServer, client_pod, curl, deploy_hello, wait_for
from tests.cluster.pytest_plugin import kubectl, live_pods

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_deleted_pod_is_replaced_and_intercepted_again(namespace, tmp_path):
    ns = namespace
    deploy_hello(ns)
    client_pod(ns)
    local = LocalServer("laptop")
    run = Intercepting(tmp_path, "hello", "--port", str(local.port), "--mount", "false", "-n", ns)
    try:
        first = run.ready()["pods"]
        wait_for("the laptop's answer", lambda: curl(ns, f"http://hello.{ns}/") == "laptop")
        # Stage 1: the pod goes away; the Deployment makes a new one (with the agent: the template has it).
        kubectl("delete", "pod", first[0], "--wait=false", ns=ns)
        kubectl("rollout", "status", "deployment/hello", "--timeout=120s", ns=ns, timeout=150)
        new = [p["metadata"]["name"] for p in live_pods(ns, "app=hello")]
        assert new and first[0] not in new
        # Stage 2: traffic reaches the laptop through the new pod, tpenv still the same process.
        wait_for("the laptop's answer through the new pod", lambda: curl(ns, f"http://hello.{ns}/") == "laptop", 90)
        assert run.proc.poll() is None
    finally:
        run.stop()
        local.close()
