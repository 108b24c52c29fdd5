"""Seed 002 (hello): intercept an echo server's Service, leave, uninstall; specs back as they were."""
from __future__ import annotations

import json

import pytest

from test_intercept_kit import (Intercepting, LocalServer, agent_in_pods, client_pod, curl, deploy_hello, spec_of,
                                tpenv, wait_for)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_hello_intercept_leave_uninstall(namespace, tmp_path):
    ns = namespace
    # Stage 1: the seed's cluster: Deployment hello + Service 80 -> 8080, a client pod.
    deploy_hello(ns)
    client_pod(ns)
    before = {"deployment": spec_of("deployment", "hello", ns), "service": spec_of("service", "hello", ns)}
    # Rolled out is not yet routed: kube-proxy programs the new Service a moment later (no event).
    wait_for("the cluster's answer", lambda: json.loads(curl(ns, f"http://hello.{ns}/"))["source"] == "cluster")
    assert "not yet installed" in tpenv(tmp_path, "list", "-n", ns).stdout

    # Stage 2: intercept with a local server; the client's request reaches the laptop.
    local = LocalServer("hello from the laptop")
    run = Intercepting(tmp_path, "hello", "--port", str(local.port), "--mount", "false", "-n", ns)
    try:
        info = run.ready()
        assert info["name"] == "hello" and info["state"] == "ACTIVE" and info["workload_kind"] == "Deployment"
        assert info["destination"] == f"127.0.0.1:{local.port}" and info["match"] is None
        # kube-proxy applies the switch to the agents a moment after the API says so (no event for it).
        wait_for("the laptop's answer", lambda: curl(ns, f"http://hello.{ns}/") == "hello from the laptop")
        listed = tpenv(tmp_path, "list", "-n", ns).stdout
        assert listed.startswith("hello: intercepted") and f"{info['id']} (this machine)" in listed

        # Stage 3: leave from another shell; the cluster answers again, the agent stays.
        tpenv(tmp_path, "leave", "hello")
        assert run.proc.wait(60) == 0
        wait_for("the cluster's answer", lambda: json.loads(curl(ns, f"http://hello.{ns}/"))["source"] == "cluster")
        assert agent_in_pods(ns, "app=hello"), "the agent should stay installed after leave"
        assert "already installed" in tpenv(tmp_path, "list", "-n", ns).stdout
    finally:
        run.stop()
        local.close()

    # Stage 4: uninstall restores the Deployment and the Service spec exactly.
    tpenv(tmp_path, "uninstall", "--agent", "hello", "-n", ns)
    assert spec_of("deployment", "hello", ns) == before["deployment"]
    assert spec_of("service", "hello", ns) == before["service"]
    assert agent_in_pods(ns, "app=hello") == []
    # The restored targetPort reaches kube-proxy's rules a moment after the API has it.
    wait_for("the cluster's answer after uninstall",
             lambda: json.loads(curl(ns, f"http://hello.{ns}/"))["source"] == "cluster")
