"""The agent's ports are settings end to end (issue 14): TPENV_AGENT_SSH_PORT and
TPENV_AGENT_HEALTH_PORT, set in the client's environment, become the injected agent's listen
addresses and probes, and the client dials the SSH port it set, so the tunnel works on them.
Checked on what lands in the cluster (the pod spec, the pod's readiness through the probes) and on
traffic: a request in the cluster reaches the laptop through the tunnel on the non-default port.
"""
from __future__ import annotations

import json

import pytest

from tests.cluster.pytest_plugin import live_pods
from tests.e2e.test_intercept_kit import (Intercepting, LocalServer, client_pod, curl, deploy_hello, tpenv,
                                          wait_for)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# Neither default (7922, 7921) nor a port the hello app or the agent's listeners (7900 up) use.
PORTS = {"TPENV_AGENT_SSH_PORT": "7962", "TPENV_AGENT_HEALTH_PORT": "7961"}


def agent_of(pod: dict) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "tpenv-agent")


def test_non_default_ssh_and_health_ports_reach_the_pod_and_carry_the_tunnel(namespace, tmp_path):
    ns = namespace
    # Stage 1: the hello Deployment and a client pod; the cluster answers before any intercept.
    deploy_hello(ns)
    client_pod(ns)
    wait_for("the cluster's answer", lambda: json.loads(curl(ns, f"http://hello.{ns}/"))["source"] == "cluster")

    # Stage 2: intercept with both ports changed in the environment; ready means the client's
    # SSH session to the agent opened, which it can only do on the port the agent listens on.
    local = LocalServer("hello over port 7962")
    run = Intercepting(tmp_path, "hello", "--port", str(local.port), "--mount", "false", "-n", ns, env=PORTS)
    try:
        info = run.ready()
        assert info["state"] == "ACTIVE", info

        # Stage 3: the pod spec says what the settings said: SSH on loopback:7962, health and
        # both probes on 7961; the pod is Ready, so the kubelet's probes got answers on 7961.
        pods = [p for p in live_pods(ns, "app=hello")
                if any(c["name"] == "tpenv-agent" for c in p["spec"]["containers"])]
        assert pods, "no injected hello pod"
        for pod in pods:
            agent = agent_of(pod)
            args = agent["args"]
            assert args[args.index("--ssh") + 1] == "127.0.0.1:7962", args
            assert args[args.index("--health") + 1] == "0.0.0.0:7961", args
            assert agent["readinessProbe"]["httpGet"]["port"] == 7961
            assert agent["livenessProbe"]["httpGet"]["port"] == 7961
        assert any(all(c.get("ready") for c in p["status"].get("containerStatuses") or []) for p in pods), \
            "no injected pod is Ready: the agent does not answer its probes on the health port"

        # Stage 4: traffic: a request in the cluster reaches the laptop through the tunnel.
        wait_for("the laptop's answer", lambda: curl(ns, f"http://hello.{ns}/") == "hello over port 7962")
        # Another verb that opens its own agent session reads the same setting.
        listed = tpenv(tmp_path, "list", "-n", ns, env=PORTS).stdout
        assert listed.startswith("hello: intercepted"), listed

        # Stage 5: leave; the cluster answers again.
        tpenv(tmp_path, "leave", "hello", env=PORTS)
        assert run.proc.wait(60) == 0
        wait_for("the cluster's answer", lambda: json.loads(curl(ns, f"http://hello.{ns}/"))["source"] == "cluster")
    finally:
        run.stop()
        local.close()
    tpenv(tmp_path, "uninstall", "--agent", "hello", "-n", ns, env=PORTS)
