"""tpenv.kits.kube: kubeconfig loading (tokens, exec plugins), pure selection logic, error wrapping."""
from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException

from tpenv.errors import ClusterUnreachable, ConfigError, Forbidden, NotFound, UsageError
from tpenv.kits.kube import (Kube, What, parse_workload_ref, pod_is_ready, selector_string, service_selects,
                             wrap_api_error)


def kubeconfig(tmp_path: Path, user: dict, server: str = "http://127.0.0.1:1") -> str:
    p = tmp_path / "kubeconfig"
    p.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "one",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "one", "context": {"cluster": "c", "user": "u", "namespace": "team"}},
                     {"name": "two", "context": {"cluster": "c", "user": "u"}}],
    }))
    return str(p)


# -- stage 1: kubeconfig → credentials ------------------------------------------------------------

async def test_token_context_and_namespace(tmp_path):
    path = kubeconfig(tmp_path, {"token": "abc123"})
    k = await Kube.load(path)
    assert (k.context, k.namespace, k.host) == ("one", "team", "http://127.0.0.1:1")
    assert k.auth_headers() == {"authorization": "Bearer abc123"}
    assert k.ssl_context() is None
    other = await Kube.load(path, context="two")
    assert other.namespace == "default"
    await k.close()
    await k.close()  # safe twice
    await other.close()


async def test_exec_plugin_token_is_fetched_by_running_the_plugin(tmp_path):
    # A real exec credential plugin: a Python script printing an ExecCredential.
    plugin = tmp_path / "plugin.py"
    plugin.write_text("import json; print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1beta1',"
                      " 'kind': 'ExecCredential', 'status': {'token': 'from-exec'}}))\n")
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable,
                     "args": [str(plugin)], "interactiveMode": "Never"}}
    k = await Kube.load(kubeconfig(tmp_path, user))
    assert k.auth_headers() == {"authorization": "Bearer from-exec"}
    await k.close()


async def test_missing_kubeconfig_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        await Kube.load(str(tmp_path / "nope"))


async def test_unknown_context_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nosuch"):
        await Kube.load(kubeconfig(tmp_path, {"token": "x"}), context="nosuch")


# -- stage 2: API errors are wrapped at the edge ----------------------------------------------------

def api_error(status: int, message: str) -> ApiException:
    e = ApiException(status=status, reason="x")
    e.body = json.dumps({"kind": "Status", "message": message}).encode()
    return e


def test_404_is_not_found_with_the_servers_words():
    err = wrap_api_error(api_error(404, 'deployments.apps "nope" not found'), What("get", "deployments", "ns", "nope"))
    assert isinstance(err, NotFound) and 'deployments.apps "nope" not found' in str(err)


def test_403_is_forbidden_naming_verb_resource_and_can_i():
    err = wrap_api_error(api_error(403, "user cannot patch"), What("patch", "deployments", "team", "hello"))
    assert isinstance(err, Forbidden)
    assert "cannot patch deployments 'hello' in namespace 'team'" in str(err)
    assert err.hint == "check your rights with: kubectl auth can-i patch deployments -n team"


async def test_found_is_false_only_for_a_404(tmp_path):
    k = await Kube.load(kubeconfig(tmp_path, {"token": "x"}))

    def answers(status: int | None):
        def fn(*_args, **_kw):
            if status is not None:
                raise api_error(status, "nope")
            return type("Resp", (), {"data": b"{}"})()
        return fn

    what = What("delete", "secrets", "team", "tpenv-auth")
    assert await k.found(answers(None), what=what) is True
    assert await k.found(answers(404), what=what) is False
    with pytest.raises(Forbidden):  # anything but "not there" is still an error
        await k.found(answers(403), what=what)
    await k.close()


async def test_unreachable_api_server_is_cluster_unreachable(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    k = await Kube.load(kubeconfig(tmp_path, {"token": "x"}, server=f"http://127.0.0.1:{port}"))
    k.cfg.retries = 0
    with pytest.raises(ClusterUnreachable):
        await asyncio.wait_for(k.get_workload("deployment/hello", "team"), 30)
    await k.close()


# -- stage 3: workload refs, selectors, readiness (pure logic) ------------------------------------

def test_workload_refs():
    assert parse_workload_ref("hello") == (None, "hello")
    assert parse_workload_ref("deployment/hello") == ("Deployment", "hello")
    assert parse_workload_ref("deploy/hello") == ("Deployment", "hello")
    assert parse_workload_ref("statefulset/db") == ("StatefulSet", "db")
    assert parse_workload_ref("deployments.apps/x") == ("Deployment", "x")
    assert parse_workload_ref("rs/x") == ("ReplicaSet", "x")
    with pytest.raises(UsageError):
        parse_workload_ref("service/hello")
    with pytest.raises(UsageError):
        parse_workload_ref("deployment/")


def test_selector_string():
    sel = {"matchLabels": {"b": "2", "a": "1"},
           "matchExpressions": [{"key": "t", "operator": "In", "values": ["x", "y"]},
                                {"key": "u", "operator": "NotIn", "values": ["z"]},
                                {"key": "e", "operator": "Exists"}, {"key": "d", "operator": "DoesNotExist"}]}
    assert selector_string(sel) == "a=1,b=2,t in (x,y),u notin (z),e,!d"


def test_service_selection():
    labels = {"app": "hello", "tier": "web"}
    assert service_selects({"spec": {"selector": {"app": "hello"}}}, labels)
    assert not service_selects({"spec": {"selector": {"app": "other"}}}, labels)
    assert not service_selects({"spec": {}}, labels)  # no selector: picks nothing


def test_pod_readiness():
    ready = {"metadata": {}, "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert pod_is_ready(ready)
    assert not pod_is_ready({**ready, "metadata": {"deletionTimestamp": "now"}})
    assert not pod_is_ready({"metadata": {}, "status": {"phase": "Pending"}})
    assert not pod_is_ready({"metadata": {}, "status": {"phase": "Running",
                                                        "conditions": [{"type": "Ready", "status": "False"}]}})


async def test_tracked_applies_each_event_before_yielding_it():
    from tpenv.kits.kube import tracked

    def pod(uid: str, rv: str) -> dict:
        return {"metadata": {"uid": uid, "resourceVersion": rv}}

    async def events():
        for ev in [("ADDED", pod("a", "1")), ("ADDED", pod("b", "2")), ("MODIFIED", pod("a", "3")),
                   ("DELETED", pod("b", "4")), ("DELETED", pod("zz", "5"))]:
            yield ev

    pods: dict = {}
    seen = []
    async for kind, obj in tracked(events(), pods):
        seen.append((kind, sorted((u, p["metadata"]["resourceVersion"]) for u, p in pods.items())))
    assert seen == [("ADDED", [("a", "1")]), ("ADDED", [("a", "1"), ("b", "2")]),
                    ("MODIFIED", [("a", "3"), ("b", "2")]), ("DELETED", [("a", "3")]), ("DELETED", [("a", "3")])]
