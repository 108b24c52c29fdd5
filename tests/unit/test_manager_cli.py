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
