"""Client-side injection glue: plans from tpenv settings, the tpenv-auth Secret, restore plans."""
from __future__ import annotations

import base64
import copy

import pytest

from tpenv.engine.injection import auth_secret_manifest, inject_settings, plan_injection, restore_plan
from tpenv.errors import PermanentError
from tpenv.settings import Settings
from tpenv_agent.inpod import ephemeral_redirect, redirect_state

WORKLOAD = {
    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "hello", "namespace": "dev"},
    "spec": {"selector": {"matchLabels": {"app": "hello"}},
             "template": {"metadata": {"labels": {"app": "hello"}},
                          "spec": {"containers": [{"name": "hello", "image": "hello:1",
                                                   "ports": [{"name": "http", "containerPort": 8000}]}]}}},
}
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello", "namespace": "dev"},
           "spec": {"selector": {"app": "hello"}, "ports": [{"name": "http", "port": 80, "targetPort": 8000}]}}


def agent_of(workload):
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "tpenv-agent")


# --- stage 1: settings reach the agent container ------------------------------------------------

def test_settings_model_becomes_the_agent_image_and_lease():
    s = Settings.model_validate({"agent": {"image": "me/agent:7", "image_pull_policy": "Never", "lease_seconds": 3,
                                           "memory_limit": "512Mi", "cpu_limit": "1"}})
    resources = {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}}
    assert inject_settings(s) == {"agent_image": "me/agent:7", "image_pull_policy": "Never", "lease": 3,
                                  "resources": resources, "ssh_port": 7922, "health_port": 7921,
                                  "redirect_via": "ephemeral"}
    plan = plan_injection(WORKLOAD, SERVICE, "http", s)
    agent = agent_of(plan.workload)
    assert agent["image"] == "me/agent:7" and agent["imagePullPolicy"] == "Never"
    assert agent["resources"] == resources
    assert agent["args"][agent["args"].index("--lease") + 1] == "3"


def test_agent_ports_from_the_settings_reach_the_listen_addresses_and_the_probes():
    # The client dials settings.agent.ssh_port: an injector with its own port would break every tunnel.
    s = Settings.model_validate({"agent": {"ssh_port": 7932, "health_port": 7931}})
    agent = agent_of(plan_injection(WORKLOAD, SERVICE, "http", s).workload)
    args = agent["args"]
    assert args[args.index("--ssh") + 1] == "127.0.0.1:7932"  # loopback only, whatever the port
    assert args[args.index("--health") + 1] == "0.0.0.0:7931"
    assert agent["readinessProbe"]["httpGet"]["port"] == agent["livenessProbe"]["httpGet"]["port"] == 7931


def test_agent_ports_are_not_handed_to_the_app_nor_equal():
    # An app already on the agent's SSH port: the agent's listener port skips it.
    wl = copy.deepcopy(WORKLOAD)
    wl["spec"]["template"]["spec"]["containers"][0]["ports"].append({"name": "x", "containerPort": 7901})
    s = Settings.model_validate({"agent": {"ssh_port": 7900, "health_port": 7902}})
    assert plan_injection(wl, SERVICE, "http", s).record["ports"][0]["agent_port"] == 7903
    with pytest.raises(ValueError, match="two different ports"):
        Settings.model_validate({"agent": {"ssh_port": 7921}})


def test_agent_resources_are_checked_quantities():
    # A quantity the API server would rewrite ("0.5") would look like a change at every read-back.
    for bad in ({"cpu_request": "0.5"}, {"memory_limit": "lots"}, {"memory_request": ""}):
        with pytest.raises(ValueError):
            Settings.model_validate({"agent": bad})


# --- stage 2: plans ---------------------------------------------------------------------------------

def test_first_plan_redirects_in_the_pod_and_leaves_a_numeric_service_alone():
    before = copy.deepcopy((WORKLOAD, SERVICE))
    plan = plan_injection(WORKLOAD, SERVICE, 80, Settings(), via="init")
    assert plan.workload_changed and plan.needs_auth_secret and plan.service is None
    assert plan.record["mode"] == "redirect" and "via" not in plan.record
    assert plan.record["ports"] == [{"name": "tpenv-8000", "agent_port": 7900, "app_port": 8000}]
    init = plan.workload["spec"]["template"]["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["tpenv-init"] and init[0]["args"] == ["init", "--redirect", "8000:7900"]
    assert (WORKLOAD, SERVICE) == before


def test_by_default_the_redirect_is_an_ephemeral_container_the_template_asks_for():
    # Stage 1: the settings' default: no init container, the template marked instead.
    plan = plan_injection(WORKLOAD, SERVICE, 80, Settings())
    tpl = plan.workload["spec"]["template"]
    assert plan.record["mode"] == "redirect" and plan.record["via"] == "ephemeral"
    assert "initContainers" not in tpl["spec"]
    assert tpl["metadata"]["annotations"]["tpenv.io/redirect"] == "ephemeral"
    # Stage 2: a pod from it gets the same redirect the init container would install, from its agent.
    pod = {"metadata": copy.deepcopy(tpl["metadata"]), "spec": copy.deepcopy(tpl["spec"])}
    eph = ephemeral_redirect(pod, "tpenv-agent")
    assert eph["name"] == "tpenv-redirect" and eph["args"] == ["init", "--redirect", "8000:7900"]
    assert eph["image"] == agent_of(plan.workload)["image"] and "resources" not in eph
    assert eph["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert redirect_state(pod) == ("missing", "")
    # Stage 3: added, running, then ended: only exit 0 counts as done.
    pod["spec"]["ephemeralContainers"] = [eph]
    assert ephemeral_redirect(pod, "tpenv-agent") is None and redirect_state(pod)[0] == "running"
    pod["status"] = {"ephemeralContainerStatuses": [{"name": "tpenv-redirect", "state": {"terminated": {
        "exitCode": 1, "message": "iptables: no chain"}}}]}
    assert redirect_state(pod) == ("failed", "exit 1: iptables: no chain")
    pod["status"]["ephemeralContainerStatuses"][0]["state"]["terminated"] = {"exitCode": 0}
    assert redirect_state(pod) == ("done", "")
    # Stage 4: planned again, nothing changes; restored, the template is as it was.
    again = plan_injection(plan.workload, SERVICE, 80, Settings(), auth_secret_exists=True)
    assert not again.workload_changed
    assert restore_plan(plan.workload, SERVICE).workload == WORKLOAD
    # Stage 5: an agent injected with the init container keeps it whatever the settings now say.
    old = plan_injection(WORKLOAD, SERVICE, 80, Settings(), via="init")
    assert not plan_injection(old.workload, SERVICE, 80, Settings(), auth_secret_exists=True).workload_changed


def test_where_the_redirect_is_forbidden_the_hand_over_rewrites_a_numeric_service():
    why = "namespace 'dev' enforces Pod Security level 'baseline'"
    plan = plan_injection(WORKLOAD, SERVICE, 80, Settings(), redirect=(False, why))
    assert plan.service["spec"]["ports"][0]["targetPort"] == "tpenv-8000"
    assert plan.record["why"] == why and "mode" not in plan.record
    assert "initContainers" not in plan.workload["spec"]["template"]["spec"]


def test_planning_an_injected_port_again_changes_nothing():
    first = plan_injection(WORKLOAD, SERVICE, "http", Settings())
    again = plan_injection(first.workload, first.service or SERVICE, "http", Settings(), auth_secret_exists=True)
    assert not again.workload_changed and again.service is None and not again.needs_auth_secret


def test_inject_errors_become_permanent_errors_naming_the_workload():
    with pytest.raises(PermanentError, match=r"Deployment/hello.*exposes no port 'grpc'"):
        plan_injection(WORKLOAD, SERVICE, "grpc", Settings())


def test_restore_plan_undoes_the_injection():
    plan = plan_injection(WORKLOAD, SERVICE, "http", Settings())
    back = restore_plan(plan.workload, plan.service)
    assert back.workload_changed and back.workload == WORKLOAD and back.service is None  # never changed
    handed = plan_injection(WORKLOAD, SERVICE, "http", Settings(), redirect=(False, "forbidden"))
    back = restore_plan(handed.workload, handed.service)
    assert back.workload == WORKLOAD and back.service == SERVICE
    untouched = restore_plan(WORKLOAD, SERVICE)
    assert not untouched.workload_changed and untouched.service is None


# --- stage 3: the auth Secret of protocol §2 ---------------------------------------------------------

def test_auth_secret_holds_the_four_keys_base64():
    material = {"ca_key": b"CA-PRIV", "ca.pub": b"ssh-ed25519 AAA ca", "host_key": b"HOST-PRIV",
                "host_key.pub": b"ssh-ed25519 BBB host"}
    secret = auth_secret_manifest("dev", material)
    assert secret["metadata"] == {"name": "tpenv-auth", "namespace": "dev",
                                  "labels": {"app.kubernetes.io/managed-by": "tpenv"}}
    assert {k: base64.b64decode(v) for k, v in secret["data"].items()} == material
    with pytest.raises(ValueError, match="host_key"):
        auth_secret_manifest("dev", {"ca_key": b"x", "ca.pub": b"y"})
