"""Pure logic of the agent and intercept engines: ports, stall causes, the intercept flags."""
from __future__ import annotations

import argparse
import os

import pytest

from tpenv.cli.verbs.intercept import add_arguments, command_env, docker_argv, intercepting_text
from tpenv.config.flags import intercept_from_flags
from tpenv.engine.agents import _readiness_cause, _stall_cause, agent_port_name, pod_serves, service_port
from tpenv.errors import NotFound, UsageError

SVC = {"metadata": {"name": "web"}, "spec": {"ports": [{"name": "http", "port": 80, "targetPort": "http"},
                                                      {"name": "admin", "port": 9000, "targetPort": 9000}]}}


# -- stage 1: which Service port, which agent port name -----------------------------------------

def test_service_port_by_name_number_and_the_only_one():
    assert service_port(SVC, "http")["port"] == 80
    assert service_port(SVC, 9000)["name"] == "admin"
    one = {"metadata": {"name": "hello"}, "spec": {"ports": [{"port": 80, "targetPort": 8080}]}}
    assert service_port(one, None)["port"] == 80
    with pytest.raises(UsageError, match="several ports"):
        service_port(SVC, None)
    with pytest.raises(NotFound, match=r"exposes no port 81 \(its ports: http=80, admin=9000\)"):
        service_port(SVC, 81)


def test_agent_port_name_follows_the_protocol():
    assert agent_port_name({"port": 80, "targetPort": "http"}) == "http"
    assert agent_port_name({"port": 80, "targetPort": 8080}) == "tpenv-8080"
    assert agent_port_name({"port": 80, "targetPort": "8080"}) == "tpenv-8080"
    assert agent_port_name({"port": 80}) == "tpenv-80"


def test_pod_serves_reads_the_agents_listen_args():
    pod = {"spec": {"containers": [{"name": "app"}, {"name": "tpenv-agent",
                                                     "args": ["sidecar", "--listen", "7900:8080:tpenv-8080"]}]}}
    assert pod_serves(pod, "tpenv-8080")
    assert not pod_serves(pod, "http")
    assert not pod_serves({"spec": {"containers": [{"name": "app"}]}}, "tpenv-8080")


# -- stage 2: why a rollout stalls ----------------------------------------------------------------

def pod(statuses=(), conditions=()):
    return {"metadata": {"name": "web-1"}, "status": {"containerStatuses": list(statuses),
                                                      "conditions": list(conditions)}}


def test_stall_causes_are_named():
    pull = pod([{"name": "tpenv-agent", "image": "tpenv/agent:x",
                 "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "not present"}}}])
    assert "image pull failed for container 'tpenv-agent'" in _stall_cause(pull, 0, 0)
    crash = pod([{"name": "app", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                  "lastState": {"terminated": {"exitCode": 3, "reason": "Error"}}}])
    assert "keeps crashing (exit 3" in _stall_cause(crash, 0, 0)
    unsched = pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                               "message": "0/1 nodes are available"}])
    assert _stall_cause(unsched, now=5, since=0) is None  # the scheduler may still place it
    assert "cannot be scheduled: 0/1 nodes are available" in _stall_cause(unsched, now=60, since=0)
    starting = pod([{"name": "app", "state": {"waiting": {"reason": "ContainerCreating"}}}])
    assert _stall_cause(starting, 0, 0) is None


def test_readiness_cause_names_the_unready_running_container():
    p = pod([{"name": "tpenv-agent", "ready": False, "state": {"running": {}}}])
    assert "'tpenv-agent' of pod web-1 runs but is not ready" in _readiness_cause([p])


# -- stage 3: intercept flags → the config model ---------------------------------------------------

def flags(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_flags_build_the_intercept():
    ic = intercept_from_flags(flags("deployment/web", "--port", "8080:http", "--http-header", "x-dev=alice",
                                    "--http-path-prefix", "/api", "--env-file", "w.env", "--env-syntax", "sh",
                                    "--mount", "./vol", "--rewrite-env", "TOKEN_FILE"))
    assert (ic.name, ic.workload, str(ic.port)) == ("web", "deployment/web", "8080:http")
    assert ic.match.wire("s:web") == {"headers": {"x-dev": "alice"}, "path": {"prefix": "/api"}}
    # Paths in flags are where the user stands.
    assert (ic.env.file, ic.env.format) == (os.path.abspath("w.env"), "sh")
    assert (ic.mount.path, ic.mount.rewrite_env) == (os.path.abspath("vol"), ["TOKEN_FILE"])
    auto = intercept_from_flags(flags("web", "--http-header", "auto", "--mount", "false"))
    assert auto.match.wire("abc:web")["headers"] == {"x-telepresence-intercept-id": "abc:web"}
    assert auto.mount.path is False and auto.port.local == 8080


def test_bad_flags_are_usage_errors():
    with pytest.raises(UsageError, match="expected NAME=REGEX"):
        intercept_from_flags(flags("web", "--http-header", "novalue"))
    with pytest.raises(UsageError, match="port"):
        intercept_from_flags(flags("web", "--port", "http:8080"))
    with pytest.raises(UsageError, match="needs a mount"):
        intercept_from_flags(flags("web", "--mount", "false", "--rewrite-env", "X"))


def test_intercepting_text_like_telepresence():
    assert intercepting_text(None) == "all TCP connections"
    assert intercepting_text({"headers": {"x-dev": "bob"}, "path": {"prefix": "/api"}}) == \
        "HTTP requests that match all of: header('x-dev') ~ /bob/, path prefix '/api'"


def test_command_env_keeps_the_local_path(monkeypatch):
    monkeypatch.setenv("PATH", "/local/bin")
    env = command_env({"PATH": "/pod/bin", "DB": "x"})
    assert env == {**{k: v for k, v in env.items() if k not in ("PATH", "DB")}, "PATH": "/local/bin", "DB": "x"}


def test_docker_run_line():
    args = flags("web", "--docker-run")
    args.command = ["img:1", "serve"]  # what the CLI puts there from `-- IMAGE ARGS`
    argv = docker_argv(args, "/tmp/e.env", "/tmp/vol",
                       ["/data", "/var/run/x"], 8080, "/usr/bin/podman")
    assert argv == ["/usr/bin/podman", "run", "--rm", "--env-file", "/tmp/e.env", "-p", "8080:8080",
                    "-v", "/tmp/vol/data:/data", "-v", "/tmp/vol/var/run/x:/var/run/x", "img:1", "serve"]


def test_docker_run_picks_a_reachable_engine(monkeypatch):
    from tpenv.cli.verbs import intercept
    from tpenv.errors import MissingTool

    tools = {"docker": "/usr/bin/docker", "podman": "/usr/bin/podman"}
    monkeypatch.setattr(intercept.shutil, "which", lambda name: tools.get(name))
    monkeypatch.setattr(intercept.os.path, "exists", lambda path: False)
    assert intercept.container_engine({}) == "/usr/bin/podman"  # a docker CLI without a daemon
    assert intercept.container_engine({"DOCKER_HOST": "tcp://127.0.0.1:2375"}) == "/usr/bin/docker"
    del tools["podman"]
    assert intercept.container_engine({}) == "/usr/bin/docker"  # its own error will say what is missing
    tools.clear()
    with pytest.raises(MissingTool, match="neither docker nor podman"):
        intercept.container_engine({})


# -- stage 4: webhook mode and missing tools ---------------------------------------------------

def test_webhook_mode_is_the_template_label_and_the_container_comes_from_the_agent():
    from tpenv.engine.agents import pod_agent_container_arg, webhook_mode
    from tpenv.kits.kube import Workload

    tpl = {"metadata": {"labels": {"app": "web", "tpenv.io/inject-agent": "enabled"}}, "spec": {"containers": []}}
    assert webhook_mode(Workload("Deployment", "web", "ns", {"spec": {"template": tpl}}))
    tpl["metadata"]["labels"].pop("tpenv.io/inject-agent")
    assert not webhook_mode(Workload("Deployment", "web", "ns", {"spec": {"template": tpl}}))
    pod = {"spec": {"containers": [{"name": "tpenv-agent", "args": ["sidecar", "--container", "app", "--listen", "x"]}]}}
    assert pod_agent_container_arg(pod) == "app"


def test_missing_sshfs_is_a_missing_tool_error(monkeypatch, tmp_path):
    from tpenv.engine.mounts import check_fuse
    from tpenv.errors import MissingTool

    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without sshfs: the real lookup, nothing mocked
    with pytest.raises(MissingTool, match="sshfs is not installed") as err:
        check_fuse()
    assert "--mount false" in err.value.hint
