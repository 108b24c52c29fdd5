"""`tpenv manager ... --dry-run` through the real CLI entry point: manifests out, nothing applied."""
from __future__ import annotations

import json

from ruamel.yaml import YAML

from tpenv.cli.main import main


def test_install_dry_run_prints_a_yaml_stream_with_team_mode(capsys, monkeypatch):
    monkeypatch.setenv("TPENV_AGENT_IMAGE", "example.org/tpenv/agent:1.2")
    assert main(["manager", "install", "--dry-run", "--team-mode"]) == 0
    docs = list(YAML(typ="safe", pure=True).load_all(capsys.readouterr().out))
    assert {d["kind"] for d in docs} >= {"Namespace", "Deployment", "MutatingWebhookConfiguration", "Secret"}
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert cm["data"]["team_mode"] == "true"
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "example.org/tpenv/agent:1.2"


def test_install_dry_run_without_team_mode_and_as_json(capsys):
    assert main(["manager", "install", "--dry-run", "-o", "json"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert next(d for d in docs if d["kind"] == "ConfigMap")["data"]["team_mode"] == "false"


def test_uninstall_dry_run_lists_the_objects_webhook_first(capsys):
    assert main(["manager", "uninstall", "--dry-run", "-o", "json"]) == 0
    names = json.loads(capsys.readouterr().out)["delete"]
    assert names[0] == "MutatingWebhookConfiguration/tpenv-agent-injector" and names[-1] == "Namespace/tpenv"


def _relay_args(docs: list[dict]) -> list[str]:
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    return [args[i + 1] for i, a in enumerate(args) if a == "--relay-cidr"]


def test_relay_ranges_from_the_flag_or_the_setting(capsys, monkeypatch):
    # Stage 1: no ranges given: the relay discovers them (no --relay-cidr in its args).
    assert main(["manager", "install", "--dry-run", "-o", "json"]) == 0
    assert _relay_args(json.loads(capsys.readouterr().out)) == []
    # Stage 2: the setting (comma-separated), normalized.
    monkeypatch.setenv("TPENV_MANAGER_RELAY_CIDRS", "10.244.0.0/16, 10.96.0.1/12")
    assert main(["manager", "install", "--dry-run", "-o", "json"]) == 0
    assert _relay_args(json.loads(capsys.readouterr().out)) == ["10.244.0.0/16", "10.96.0.0/12"]
    # Stage 3: the repeatable flag wins over the setting.
    assert main(["manager", "upgrade", "--dry-run", "-o", "json", "--relay-cidr", "192.168.0.0/16",
                 "--relay-cidr", "fd00::/64"]) == 0
    assert _relay_args(json.loads(capsys.readouterr().out)) == ["192.168.0.0/16", "fd00::/64"]


def test_a_bad_relay_range_is_a_usage_error(capsys):
    assert main(["manager", "install", "--dry-run", "--relay-cidr", "10.0.0.0/33"]) == 2
    err = capsys.readouterr().err
    assert "--relay-cidr" in err and "10.0.0.0/33" in err


def test_dry_run_leaves_private_keys_out_unless_asked(capsys):
    # Issue 12: dry-run output lands in terminals, CI logs and Git; the TLS key only on request.
    assert main(["manager", "install", "--dry-run", "-o", "json"]) == 0
    tls = next(d for d in json.loads(capsys.readouterr().out) if d["kind"] == "Secret")
    assert "tls.key" not in tls["data"] and "tls.crt" in tls["data"]
    assert "--with-private-keys" in tls["metadata"]["annotations"]["tpenv.io/note"]
    assert main(["manager", "install", "--dry-run", "--with-private-keys", "-o", "json"]) == 0
    tls = next(d for d in json.loads(capsys.readouterr().out) if d["kind"] == "Secret")
    assert "tls.key" in tls["data"]


def test_webhook_namespaces_from_the_flag_and_reserved_ones_refused(capsys):
    # Stage 1: repeatable; both entries select exactly these namespaces.
    assert main(["manager", "install", "--dry-run", "-o", "json", "--webhook-namespace", "shop",
                 "--webhook-namespace", "web"]) == 0
    docs = json.loads(capsys.readouterr().out)
    hooks = next(d for d in docs if d["kind"] == "MutatingWebhookConfiguration")["webhooks"]
    assert [h["namespaceSelector"]["matchExpressions"][0]["values"] for h in hooks] == [["shop", "web"]] * 2
    # Stage 2: the control plane's and tpenv's own namespaces: a usage error naming the flag.
    for ns in ("kube-system", "tpenv"):
        assert main(["manager", "install", "--dry-run", "--webhook-namespace", ns]) == 2
        err = capsys.readouterr().err
        assert "--webhook-namespace" in err and ns in err and "never injected" in err
