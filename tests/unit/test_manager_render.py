"""The manager's install manifests: rendered from templates/manager, parsed, validated, and
carrying the security-relevant choices (webhook policy, RBAC, TLS) the design asks for."""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl

import pytest
from cryptography import x509
from ruamel.yaml import YAML

from tpenv.engine import manager as m
from tpenv.engine import manager_render
from tpenv.settings import Settings

SETTINGS = {"agent_image": "tpenv/agent:t1", "image_pull_policy": "Never", "lease": 5}
SELECTED = {**SETTINGS, "webhook_namespaces": ["web", "shop"]}


@pytest.fixture(scope="module")
def tls():
    return m.generate_tls()


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


# --- stage 1: the set of objects, their labels and namespace ----------------------------------

def test_every_object_is_labelled_and_namespaced_in_tpenv(tls):
    docs = m.render_manager(SETTINGS, team_mode=False, tls=tls)
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("Namespace", "tpenv"), ("ServiceAccount", "tpenv-manager"), ("ClusterRole", "tpenv-manager"),
        ("ClusterRoleBinding", "tpenv-manager"), ("Role", "tpenv-manager"), ("RoleBinding", "tpenv-manager"),
        ("Role", "tpenv-client-config"), ("RoleBinding", "tpenv-client-config"), ("Role", "tpenv-relay-client"),
        ("ConfigMap", "tpenv-manager"), ("Secret", "tpenv-manager-tls"), ("Deployment", "tpenv-manager"),
        ("Service", "tpenv-manager"), ("MutatingWebhookConfiguration", "tpenv-agent-injector")]
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tpenv"
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"):
            assert d["metadata"]["namespace"] == "tpenv"


def test_dry_run_stream_parses_back_to_the_same_documents(tls):
    docs = m.render_manager(SETTINGS, team_mode=True, tls=tls)
    text = m.to_yaml_stream(docs)
    assert text.startswith("---\n")
    assert list(YAML(typ="safe", pure=True).load_all(text)) == docs


def test_team_mode_is_stored_for_clients(tls):
    for team, value in ((True, "true"), (False, "false")):
        (cm,) = by_kind(m.render_manager(SETTINGS, team_mode=team, tls=tls), "ConfigMap")
        assert cm["metadata"]["name"] == "tpenv-manager" and cm["data"]["team_mode"] == value


# --- stage 2: the webhook configuration ---------------------------------------------------------

def test_webhook_never_blocks_pods_and_opts_in_by_pod_label(tls):
    (cfg,) = by_kind(m.render_manager(SELECTED, team_mode=False, tls=tls), "MutatingWebhookConfiguration")
    hook, by_annotation = cfg["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "NoneOnDryRun"
    assert hook["timeoutSeconds"] <= 10
    assert hook["objectSelector"] == {"matchLabels": {"tpenv.io/inject-agent": "enabled"}}
    # Telepresence's annotation: every pod without the label goes to the manager (it cannot be
    # selected on); the two entries never both see one pod. Otherwise the same entry.
    assert by_annotation["name"] == "annotation-injector.tpenv.io"
    assert by_annotation["objectSelector"] == {"matchExpressions": [{"key": "tpenv.io/inject-agent",
                                                                     "operator": "DoesNotExist"}]}
    assert {k: v for k, v in by_annotation.items() if k not in ("name", "objectSelector")} == \
        {k: v for k, v in hook.items() if k not in ("name", "objectSelector")}
    # Only the selected namespaces, by the name the API server sets (sorted, once each).
    assert hook["namespaceSelector"] == {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop", "web"]}]}
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    assert hook["clientConfig"]["service"] == {"name": "tpenv-manager", "namespace": "tpenv", "path": "/mutate",
                                               "port": 443}
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == tls["ca.crt"]


def test_no_namespace_selected_means_no_webhook_entry_and_no_secret_right(tls):
    docs = m.render_manager(SETTINGS, team_mode=False, tls=tls)
    (cfg,) = by_kind(docs, "MutatingWebhookConfiguration")
    assert cfg["webhooks"] == []
    assert not [d for d in docs if d["metadata"]["name"] == "tpenv-manager-auth"]
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["data"]["webhook_namespaces"] == ""


@pytest.mark.parametrize("ns", ["kube-system", "kube-public", "kube-node-lease", "tpenv", "Not_A_Name"])
def test_reserved_or_invalid_namespaces_are_never_rendered(ns, tls):
    with pytest.raises(ValueError, match=ns):
        m.render_manager({**SETTINGS, "webhook_namespaces": ["shop", ns]}, team_mode=False, tls=tls)


def test_secret_creation_is_granted_per_selected_namespace_only(tls):
    docs = m.render_manager(SELECTED, team_mode=False, tls=tls)
    auth = [d for d in docs if d["metadata"]["name"] == "tpenv-manager-auth"]
    assert [(d["kind"], d["metadata"]["namespace"]) for d in auth] == [
        ("Role", "shop"), ("RoleBinding", "shop"), ("Role", "web"), ("RoleBinding", "web")]
    for d in auth:
        assert d["metadata"]["labels"]["app.kubernetes.io/component"] == "webhook-auth"
        if d["kind"] == "Role":
            assert d["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}]
        else:
            assert d["roleRef"]["name"] == "tpenv-manager-auth" and d["subjects"] == [
                {"kind": "ServiceAccount", "name": "tpenv-manager", "namespace": "tpenv"}]
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["data"]["webhook_namespaces"] == "shop,web"  # what an upgrade without the flag keeps


def test_rbac_grants_only_what_the_webhook_and_relay_use(tls):
    docs = m.render_manager(SETTINGS, team_mode=False, tls=tls)
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert cluster_role["rules"] == [  # no Secret verb at all: creation is per selected namespace
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},  # the relay's pod ranges
        {"apiGroups": ["networking.k8s.io"], "resources": ["servicecidrs"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},  # Pod Security: redirect or not
        # Events on pods the webhook refused (their names exist only after admission).
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["get"]},
        # Certificate rotation: the new CA into this one webhook configuration's caBundle.
        {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
         "resourceNames": ["tpenv-agent-injector"], "verbs": ["get", "update"]}]
    roles = {d["metadata"]["name"]: d for d in by_kind(docs, "Role")}
    assert roles["tpenv-manager"]["rules"] == [  # the relay's own keys, by name; the rotated certificate
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["tpenv-auth"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["tpenv-manager-tls"],
         "verbs": ["get", "update"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}]  # its own tpenv-auth, here only
    assert roles["tpenv-client-config"]["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["tpenv-manager"], "verbs": ["get"]}]
    bindings = {d["metadata"]["name"]: d for d in by_kind(docs, "RoleBinding")}
    assert bindings["tpenv-manager"]["subjects"] == [{"kind": "ServiceAccount", "name": "tpenv-manager",
                                                      "namespace": "tpenv"}]
    assert bindings["tpenv-manager"]["roleRef"]["name"] == "tpenv-manager"


def test_relay_client_role_is_exactly_what_a_relay_client_needs_and_is_not_bound(tls):
    docs = m.render_manager(SETTINGS, team_mode=False, tls=tls)
    (role,) = [d for d in by_kind(docs, "Role") if d["metadata"]["name"] == m.RELAY_CLIENT_ROLE]
    assert role["metadata"]["namespace"] == "tpenv"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["tpenv-auth"], "verbs": ["get"]}]
    # Reaching cluster addresses is the admin's grant to give: the install binds it to no one.
    assert all(b["roleRef"]["name"] != m.RELAY_CLIENT_ROLE for b in by_kind(docs, "RoleBinding"))


# --- stage 3: the Deployment takes its images from settings -------------------------------------

def test_deployment_runs_the_manager_role_with_settings(tls):
    (dep,) = by_kind(m.render_manager(SETTINGS, team_mode=False, tls=tls), "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "tpenv/agent:t1" and c["imagePullPolicy"] == "Never"
    assert c["command"] == ["tpenv-agent"] and c["args"][:3] == ["manager", "--tls-dir", "/tpenv/tls"]
    assert c["args"][c["args"].index("--agent-image") + 1] == "tpenv/agent:t1"
    assert c["args"][c["args"].index("--lease") + 1] == "5"
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_the_relay_listens_on_loopback_only_and_the_service_stays_webhook_only(tls):
    docs = m.render_manager(SETTINGS, team_mode=False, tls=tls)
    (dep,) = by_kind(docs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"][c["args"].index("--relay") + 1] == "127.0.0.1:8022"
    assert "--relay-cidr" not in c["args"]  # default: the relay discovers the cluster's ranges
    assert [p["containerPort"] for p in c["ports"]] == [8443]
    assert {"name": "TPENV_POD_IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}} in c["env"]
    (svc,) = by_kind(docs, "Service")
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["https"]
    # Given ranges and another port go through to the flags.
    (dep,) = by_kind(m.render_manager({**SETTINGS, "relay_port": 9022, "relay_cidrs": ["10.0.0.0/8", "fd00::/8"]},
                                      team_mode=False, tls=tls), "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--relay") + 1] == "127.0.0.1:9022"
    assert args[args.index("--relay-cidr"):] == ["--relay-cidr", "10.0.0.0/8", "--relay-cidr", "fd00::/8"]
    # The container's args are the agent's own command line.
    from tpenv_agent.manager import parse_args

    parsed = parse_args(args)
    assert parsed.relay == "127.0.0.1:9022" and parsed.relay_cidr == ["10.0.0.0/8", "fd00::/8"]


def test_settings_model_is_accepted(tls):
    s = Settings.model_validate({"agent": {"image": "reg.example/tpenv/agent:9", "image_pull_policy": "Always"}})
    (dep,) = by_kind(m.render_manager(s, team_mode=False, tls=tls), "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "reg.example/tpenv/agent:9" and c["imagePullPolicy"] == "Always"


def test_agent_ports_flow_from_settings_through_the_manager_to_the_webhooks_injection(tls):
    # The client's TPENV_AGENT_SSH_PORT/HEALTH_PORT -> the manager's flags -> the pods the webhook injects.
    from tpenv_agent.inject import inject_pod
    from tpenv_agent.manager import injection_settings, parse_args

    s = Settings.model_validate({"agent": {"ssh_port": 7942, "health_port": 7941}})
    (dep,) = by_kind(m.render_manager(s, team_mode=False, tls=tls), "Deployment")
    settings = injection_settings(parse_args(dep["spec"]["template"]["spec"]["containers"][0]["args"]))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
           "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"name": "http", "containerPort": 80}]}]}}
    agent = next(c for c in inject_pod(pod, settings)["spec"]["containers"] if c["name"] == "tpenv-agent")
    assert agent["args"][agent["args"].index("--ssh") + 1] == "127.0.0.1:7942"
    assert agent["args"][agent["args"].index("--health") + 1] == "0.0.0.0:7941"
    assert agent["readinessProbe"]["httpGet"]["port"] == 7941
    # The defaults, without settings, are the settings' defaults.
    defaults = injection_settings(parse_args(["--tls-dir", "/x"]))
    assert (defaults["ssh_port"], defaults["health_port"]) == (Settings().agent.ssh_port, Settings().agent.health_port)


def test_a_broken_template_is_reported_not_applied(tmp_path, monkeypatch, tls):
    (tmp_path / "00-bad.yaml.j2").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n")
    monkeypatch.setattr(manager_render, "TEMPLATES", tmp_path)  # where rendering reads them
    with pytest.raises(m.TemplateError, match="no metadata.name"):
        m.render_manager(SETTINGS, team_mode=False, tls=tls)


# --- stage 4: TLS material ----------------------------------------------------------------------

def test_serving_certificate_is_signed_by_the_ca_for_the_service_name(tls):
    ca = x509.load_pem_x509_certificate(tls["ca.crt"])
    cert = x509.load_pem_x509_certificate(tls["tls.crt"])
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "tpenv-manager.tpenv.svc" in names


def test_existing_tls_is_reused_until_it_nears_expiry(tls):
    secret = {"data": {k: base64.b64encode(v).decode() for k, v in tls.items()}}
    assert m.reusable_tls(secret) == tls
    later = dt.datetime.now(dt.timezone.utc) + m.CERT_LIFETIME - dt.timedelta(days=10)
    assert m.reusable_tls(secret, now=later) is None
    assert m.reusable_tls({"data": {"tls.crt": secret["data"]["tls.crt"]}}) is None
    assert m.reusable_tls(None) is None


async def test_the_agent_manager_serves_the_generated_certificate(tmp_path, tls):
    """The pair as the API server uses it: verify the webhook's certificate by caBundle and name."""
    from tpenv_agent.manager import Manager, tls_context

    for k in ("tls.crt", "tls.key"):
        (tmp_path / k).write_bytes(tls[k])
    server = await asyncio.start_server(Manager(SETTINGS).serve_connection, "127.0.0.1", 0,
                                        ssl=tls_context(tmp_path))
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context(cadata=tls["ca.crt"].decode())
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                       server_hostname="tpenv-manager.tpenv.svc")
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"ok\n")
