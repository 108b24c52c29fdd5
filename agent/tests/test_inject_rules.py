"""Rules of inject/inject_pod the golden cases do not show one by one (docs/protocol.md §1)."""
from __future__ import annotations

import copy
import json

import pytest

from tpenv_agent.inject import ANN_RESTORE, InjectError, inject, inject_pod, restore

SETTINGS = {"agent_image": "tpenv/agent:t", "image_pull_policy": "Never", "lease": 5, "redirect": False}


def deployment(*containers, kind="Deployment"):
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": "w"},
            "spec": {"selector": {"matchLabels": {"app": "w"}},
                     "template": {"metadata": {"labels": {"app": "w"}}, "spec": {"containers": list(containers)}}}}


def service(*ports, **spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {"selector": {"app": "w"}, "ports": list(ports), **spec}}


def container(name, *ports):
    return {"name": name, "image": f"{name}:1", "ports": [dict(p) for p in ports]}


def agent(workload_or_pod):
    spec = workload_or_pod["spec"]["template"]["spec"] if "template" in workload_or_pod["spec"] else workload_or_pod["spec"]
    return next(c for c in spec["containers"] if c["name"] == "tpenv-agent")


def listens(a):
    return [a["args"][i + 1] for i, x in enumerate(a["args"]) if x == "--listen"]


def ids(obj, acc=None):
    """id() of every dict and list inside obj."""
    acc = set() if acc is None else acc
    if isinstance(obj, (dict, list)):
        acc.add(id(obj))
        for v in obj.values() if isinstance(obj, dict) else obj:
            ids(v, acc)
    return acc


# --- stage 1: ports -------------------------------------------------------------------------------

def test_agent_port_skips_ports_the_pod_already_uses():
    wl = deployment(container("app", {"name": "http", "containerPort": 7900}, {"name": "x", "containerPort": 7901}))
    out, _, record = inject(wl, service({"name": "http", "port": 80, "targetPort": "http"}), "http", settings=SETTINGS)
    assert record["ports"][0]["agent_port"] == 7902
    assert listens(agent(out)) == ["7902:7900:http"]


def test_service_port_by_number_as_string_or_int():
    wl = deployment(container("app", {"name": "http", "containerPort": 8080}))
    svc = service({"name": "web", "port": 80, "targetPort": "http"})
    assert inject(wl, svc, "80", settings=SETTINGS)[0] == inject(wl, svc, 80, settings=SETTINGS)[0]


def test_udp_is_refused():
    wl = deployment(container("dns", {"name": "dns", "containerPort": 53, "protocol": "UDP"}))
    with pytest.raises(InjectError, match="only carries TCP"):
        inject(wl, service({"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}), "dns", settings=SETTINGS)
    with pytest.raises(InjectError, match="only carries TCP"):
        inject(wl, service({"name": "dns", "port": 53, "targetPort": "dns"}), "dns", settings=SETTINGS)


@pytest.mark.parametrize("where,key", [
    ("annotations", "telepresence.getambassador.io/inject-traffic-agent"),
    ("annotations", "telepresence.io/inject-traffic-agent"),
    ("labels", "tpenv.io/inject-agent"),
])
def test_a_workload_that_opts_out_is_not_patched(where, key):
    wl = deployment(container("app", {"name": "http", "containerPort": 8080}))
    wl["spec"]["template"]["metadata"].setdefault(where, {})[key] = "Disabled"
    before = copy.deepcopy(wl)
    with pytest.raises(InjectError, match=rf"opts out of the agent \(its pod template's \w+ {key}: disabled\)"):
        inject(wl, service({"name": "web", "port": 80, "targetPort": "http"}), 80, settings=SETTINGS)
    assert wl == before
    # "enabled" (the webhook's opt-in) is no refusal
    wl["spec"]["template"]["metadata"][where][key] = "enabled"
    assert inject(wl, service({"name": "web", "port": 80, "targetPort": "http"}), 80, settings=SETTINGS)[2]["ports"]


def test_one_agent_serves_one_container():
    wl = deployment(container("a", {"name": "http", "containerPort": 8080}),
                    container("b", {"name": "admin", "containerPort": 9000}))
    svc = service({"name": "http", "port": 80, "targetPort": "http"}, {"name": "admin", "port": 90, "targetPort": "admin"})
    once, _, _ = inject(wl, svc, "http", settings=SETTINGS)
    with pytest.raises(InjectError, match="already serves container 'a'"):
        inject(once, svc, "admin", settings=SETTINGS)


def test_explicit_container_must_exist_and_declare_a_named_port():
    wl = deployment(container("a", {"name": "http", "containerPort": 8080}), container("b"))
    svc = service({"name": "http", "port": 80, "targetPort": "http"})
    with pytest.raises(InjectError, match="no container named 'c'"):
        inject(wl, svc, "http", container="c", settings=SETTINGS)
    with pytest.raises(InjectError, match="container 'b' .* declares no port named 'http'"):
        inject(wl, svc, "http", container="b", settings=SETTINGS)


# --- stage 2: what the agent copies ---------------------------------------------------------------

def test_copies_share_nothing_with_the_input_or_the_app():
    app = container("app", {"name": "http", "containerPort": 8080})
    app["env"] = [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]
    app["envFrom"] = [{"prefix": "P_", "configMapRef": {"name": "c"}}]
    app["volumeMounts"] = [{"name": "v", "mountPath": "/data", "subPath": "x"}]
    wl = deployment(app)
    out, _, _ = inject(wl, service({"name": "http", "port": 80, "targetPort": "http"}), "http", settings=SETTINGS)
    assert not ids(out) & ids(wl)
    a = agent(out)
    assert not ids(a) & ids(out["spec"]["template"]["spec"]["containers"][0])
    assert a["volumeMounts"][0] == {"name": "v", "mountPath": "/tpenv/mounts/data", "subPath": "x"}


def test_settings_default_when_absent():
    wl = deployment(container("app", {"name": "http", "containerPort": 8080}))
    out, _, _ = inject(wl, service({"name": "http", "port": 80, "targetPort": "http"}), "http")
    a = agent(out)
    assert a["image"].startswith("tpenv/agent:") and a["imagePullPolicy"] == "IfNotPresent"


# --- stage 3: records ------------------------------------------------------------------------------

def test_restore_without_a_record_changes_nothing():
    wl = deployment(container("app"))
    svc = service({"port": 80})
    back_wl, back_svc = restore(wl, svc)
    assert back_wl == wl and back_svc is None and back_wl is not wl


def test_a_broken_record_is_reported():
    wl = deployment(container("app", {"name": "http", "containerPort": 8080}))
    wl["metadata"]["annotations"] = {ANN_RESTORE: "{nope"}
    with pytest.raises(InjectError, match="not valid JSON"):
        restore(wl)
    wl["metadata"]["annotations"] = {ANN_RESTORE: json.dumps({"v": 99})}
    with pytest.raises(InjectError, match="unknown format"):
        restore(wl)


def test_an_agent_without_its_record_is_not_guessed_at():
    wl = deployment(container("app", {"name": "http", "containerPort": 8080}))
    svc = service({"name": "http", "port": 80, "targetPort": "http"})
    out, _, _ = inject(wl, svc, "http", settings=SETTINGS)
    del out["metadata"]["annotations"][ANN_RESTORE]
    with pytest.raises(InjectError, match="remove that container by hand"):
        inject(out, svc, "http", settings=SETTINGS)


def test_unsupported_kinds_are_refused():
    with pytest.raises(InjectError, match="only Deployment, StatefulSet, ReplicaSet"):
        inject(deployment(container("app"), kind="DaemonSet"), service({"port": 80}), 80, settings=SETTINGS)


# --- stage 4: inject_pod (the webhook) -------------------------------------------------------------

def pod(*containers, **annotations):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "w-", "labels": {"tpenv.io/inject-agent": "enabled"},
                         **({"annotations": annotations} if annotations else {})},
            "spec": {"containers": list(containers)}}


def test_pod_app_container_from_annotations_else_first():
    a = container("sidecar", {"name": "admin", "containerPort": 15000})
    b = container("app", {"name": "http", "containerPort": 8080})
    assert agent(inject_pod(pod(a, b), SETTINGS))["args"][2] == "sidecar"
    assert agent(inject_pod(pod(a, b, **{"kubectl.kubernetes.io/default-container": "app"}), SETTINGS))["args"][2] == "app"
    chosen = inject_pod(pod(a, b, **{"tpenv.io/inject-container": "app",
                                     "kubectl.kubernetes.io/default-container": "sidecar"}), SETTINGS)
    assert listens(agent(chosen)) == ["7900:8080:http"]


def test_pod_without_named_ports_is_refused_with_advice():
    with pytest.raises(InjectError, match="tpenv.io/inject-ports"):
        inject_pod(pod(container("app", {"containerPort": 8080})), SETTINGS)


def test_pod_already_injected_is_returned_unchanged():
    once = inject_pod(pod(container("app", {"name": "http", "containerPort": 8080})), SETTINGS)
    assert inject_pod(once, SETTINGS) == once


def test_pod_record_allows_restore_like_a_workload():
    p = pod(container("app", {"name": "http", "containerPort": 8080}))
    injected = inject_pod(p, SETTINGS)
    record = json.loads(injected["metadata"]["annotations"][ANN_RESTORE])
    assert record["container"] == "app" and record["ports"][0]["renamed"] == "tpx-http"
    assert p == pod(container("app", {"name": "http", "containerPort": 8080}))  # input untouched
    assert copy.deepcopy(injected) == injected


# --- stage 5: a served port again refreshes a stale agent, and only then ---------------------------

def _served():
    app = container("app", {"name": "http", "containerPort": 8080})
    app["env"] = [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    svc = service({"name": "http", "port": 80, "targetPort": "http"})
    out, _, _ = inject(deployment(app), svc, "http", settings=SETTINGS)
    return out, svc


def test_server_defaults_do_not_count_as_stale():
    out, svc = _served()
    a = agent(out)  # what the API server adds when it stores the object
    a.update(terminationMessagePath="/dev/termination-log", terminationMessagePolicy="File")
    a["readinessProbe"].update(timeoutSeconds=1, successThreshold=1, failureThreshold=3)
    a["readinessProbe"]["httpGet"]["scheme"] = "HTTP"
    a["env"][0]["valueFrom"]["fieldRef"]["apiVersion"] = "v1"
    again, again_svc, _ = inject(out, svc, "http", settings=SETTINGS)
    assert again == out and again_svc is None


def test_new_image_or_app_env_rebuilds_only_the_agent():
    out, svc = _served()
    newer, _, _ = inject(out, svc, "http", settings={**SETTINGS, "agent_image": "tpenv/agent:t2"})
    assert agent(newer)["image"] == "tpenv/agent:t2"
    assert newer["metadata"] == out["metadata"]  # same record: restore still knows the originals
    edited = copy.deepcopy(out)
    edited["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "NEW", "value": "1"})
    refreshed, _, _ = inject(edited, svc, "http", settings=SETTINGS)
    assert {"name": "NEW", "value": "1"} in agent(refreshed)["env"]
    assert refreshed["spec"]["template"]["spec"]["containers"][0] == edited["spec"]["template"]["spec"]["containers"][0]


def test_lost_agent_container_is_reported():
    out, svc = _served()
    broken = copy.deepcopy(out)
    broken["spec"]["template"]["spec"]["containers"].pop()
    with pytest.raises(InjectError, match="lost its agent container"):
        inject(broken, svc, "http", settings=SETTINGS)


# --- issue 12: the agent is least-privilege, and reads the volumes as the app does -------------

def test_agent_security_borrows_the_apps_non_root_user_else_its_own():
    from tpenv_agent.inject import AGENT_UID, agent_security
    restricted = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                  "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    # No user given anywhere: the image's non-root user.
    sc = agent_security({"name": "app"}, {})
    assert sc == {**restricted, "runAsUser": AGENT_UID, "runAsGroup": AGENT_UID}
    # The pod's user and group, overridden by the container's own user.
    pod = {"securityContext": {"runAsUser": 1000, "runAsGroup": 3000, "fsGroup": 2000}}
    assert agent_security({"name": "app"}, pod)["runAsUser"] == 1000
    assert agent_security({"name": "app"}, pod)["runAsGroup"] == 3000
    app = {"name": "app", "securityContext": {"runAsUser": 1001}}
    assert (agent_security(app, pod)["runAsUser"], agent_security(app, pod)["runAsGroup"]) == (1001, 3000)
    # An app running as root lends nothing: the agent never runs as root.
    root_app = {"name": "app", "securityContext": {"runAsUser": 0, "runAsGroup": 0}}
    assert (agent_security(root_app, {})["runAsUser"], agent_security(root_app, {})["runAsGroup"]) == (AGENT_UID, AGENT_UID)
