"""The in-pod pieces as pure functions: the redirect's commands, opt-in and port annotations,
the Pod Security decision, and the probe renames of the hand-over (docs/protocol.md §1.2)."""
from __future__ import annotations

import copy

import pytest

from tpenv_agent import inpod, redirect
from tpenv_agent.inject import inject, restore

SETTINGS = {"agent_image": "tpenv/agent:t", "image_pull_policy": "Never", "lease": 5}


# --- stage 1: the init container's commands -------------------------------------------------------

def test_redirect_rules_match_inbound_tcp_to_each_app_port_only():
    cmds = redirect.rules("iptables-nft", [(8080, 7900), (9000, 7901)])
    assert cmds == [
        ["iptables-nft", "-w", "-t", "nat", "-A", "TPENV_INBOUND", "-p", "tcp", "--dport", "8080",
         "-j", "REDIRECT", "--to-ports", "7900"],
        ["iptables-nft", "-w", "-t", "nat", "-A", "TPENV_INBOUND", "-p", "tcp", "--dport", "9000",
         "-j", "REDIRECT", "--to-ports", "7901"],
    ]


@pytest.mark.parametrize("bad", ["8080", "x:1", "0:7900", "8080:70000"])
def test_redirect_arguments_are_checked(bad, capsys):
    with pytest.raises(SystemExit):
        redirect.parser().parse_args(["--redirect", bad])


def test_init_container_has_only_net_admin():
    c = inpod.init_container([{"app_port": 8080, "agent_port": 7900}], {**SETTINGS})
    assert c["args"] == ["init", "--redirect", "8080:7900"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


# --- stage 2: who opted in, which ports, which mode --------------------------------------------

def pod(labels=None, annotations=None):
    return {"metadata": {"labels": labels or {}, "annotations": annotations or {}}}


def test_opt_in_by_label_or_either_telepresence_annotation():
    assert inpod.opted_in(pod({"tpenv.io/inject-agent": "enabled"})) == "label tpenv.io/inject-agent"
    assert inpod.opted_in(pod(annotations={"telepresence.io/inject-traffic-agent": "enabled"}))
    assert inpod.opted_in(pod(annotations={"telepresence.getambassador.io/inject-traffic-agent": "Enabled"}))
    assert inpod.opted_in(pod(annotations={"telepresence.getambassador.io/inject-traffic-agent": "disabled"})) is None
    assert inpod.opted_in(pod({"tpenv.io/inject-agent": "no"})) is None


def test_port_annotations_tpenv_first_then_telepresence_with_protocol_suffix():
    both = pod(annotations={"tpenv.io/inject-ports": "http", "telepresence.io/inject-container-ports": "9000"})
    assert inpod.port_annotation(both) == ("tpenv.io/inject-ports", "http")
    assert inpod.parse_ports("k", "http, 9000/TCP,") == ["http", 9000]
    # UDP items are left to the app; only a list with no TCP port is refused
    assert inpod.parse_ports("k", "http,dns/UDP, 53/udp") == ["http"]
    with pytest.raises(ValueError, match=r"names no TCP port \(53/UDP\)"):
        inpod.parse_ports("k", "53/UDP")
    with pytest.raises(ValueError, match="names no TCP port"):
        inpod.parse_ports("k", " , ")
    # Telepresence's "all" is every port: what the agent takes without an annotation; and it
    # still outranks a later annotation (tpenv's first).
    assert inpod.port_annotation(pod(annotations={"telepresence.io/inject-container-ports": "all"})) is None
    assert inpod.port_annotation(pod(annotations={"tpenv.io/inject-ports": "All",
                                                  "telepresence.io/inject-container-ports": "9000"})) is None


def test_telepresence_service_selection_is_known_and_not_a_port_choice():
    # The singular Telepresence documents and the plural its code reads first, both domains:
    # named here (so docs and code agree), and never taken as container ports.
    for key in ("telepresence.getambassador.io/inject-service-port", "telepresence.io/inject-service-ports",
                "telepresence.getambassador.io/inject-service-name"):
        assert key in inpod.TP_SERVICE_SELECTION
        assert inpod.port_annotation(pod(annotations={key: "https"})) is None


def test_pod_security_baseline_and_restricted_forbid_the_redirect():
    for level in ("baseline", "restricted"):
        ok, why = inpod.redirect_allowed("shop", {"pod-security.kubernetes.io/enforce": level})
        assert not ok and f"'{level}'" in why and "NET_ADMIN" in why
    assert inpod.redirect_allowed("shop", {"pod-security.kubernetes.io/enforce": "privileged"}) == (True, "")
    assert inpod.redirect_allowed("shop", None) == (True, "")


# --- stage 3: the hand-over renames probes and hooks with the port, and restore puts them back ----

def test_hand_over_renames_probes_and_hooks_naming_the_port_and_restore_undoes_it():
    app = {"name": "app", "image": "a", "ports": [{"name": "web", "containerPort": 8080}],
           "readinessProbe": {"httpGet": {"path": "/r", "port": "web"}},
           "livenessProbe": {"tcpSocket": {"port": "web"}},
           "startupProbe": {"httpGet": {"path": "/s", "port": 8080}},
           "lifecycle": {"preStop": {"httpGet": {"path": "/q", "port": "web"}}}}
    wl = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w"},
          "spec": {"selector": {"matchLabels": {"a": "w"}},
                   "template": {"metadata": {"labels": {"a": "w"}}, "spec": {"containers": [app]}}}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
           "spec": {"ports": [{"name": "http", "port": 80, "targetPort": "web"}]}}
    out, _, record = inject(wl, svc, "http", settings={**SETTINGS, "redirect": False, "redirect_off": "x"})
    got = out["spec"]["template"]["spec"]["containers"][0]
    assert got["readinessProbe"]["httpGet"]["port"] == "tpx-web" and got["livenessProbe"]["tcpSocket"]["port"] == "tpx-web"
    assert got["lifecycle"]["preStop"]["httpGet"]["port"] == "tpx-web"
    assert got["startupProbe"]["httpGet"]["port"] == 8080  # a number needs nothing
    assert record["ports"][0]["probes"] == ["readinessProbe.httpGet", "livenessProbe.tcpSocket",
                                            "lifecycle.preStop.httpGet"]
    back, _ = restore(out)
    assert back == wl


def test_redirect_leaves_the_app_untouched_and_restore_removes_the_init_container():
    app = {"name": "app", "image": "a", "ports": [{"name": "web", "containerPort": 8080}],
           "readinessProbe": {"httpGet": {"path": "/r", "port": "web"}}}
    wl = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "w"},
          "spec": {"selector": {"matchLabels": {"a": "w"}},
                   "template": {"metadata": {"labels": {"a": "w"}}, "spec": {"containers": [copy.deepcopy(app)]}}}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
           "spec": {"clusterIP": "None", "ports": [{"name": "web", "port": 8080, "targetPort": "web"}]}}
    out, patched_svc, record = inject(wl, svc, "web", settings=SETTINGS)
    spec = out["spec"]["template"]["spec"]
    assert patched_svc is None and record["mode"] == "redirect"
    assert spec["containers"][0] == app
    assert [c["name"] for c in spec["initContainers"]] == ["tpenv-init"]
    assert "ports" not in next(c for c in spec["containers"] if c["name"] == "tpenv-agent")
    assert restore(out)[0] == wl
