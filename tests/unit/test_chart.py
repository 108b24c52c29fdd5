"""The manager's Helm chart generator, without helm (tests/e2e/test_helm_chart.py renders and
installs it with the real one): it keeps up with templates/manager, and its values are the
settings' defaults. A template change the generator cannot express fails here, in the fast suite."""
from __future__ import annotations

import re

from ruamel.yaml import YAML

from tpenv.engine.chart import VALUES, chart_yaml, manifest_template, values_yaml, write_chart
from tpenv.engine.manager import render_manager
from tpenv.settings import Settings


def test_the_chart_has_every_object_of_the_install_and_no_sentinel_left():
    text = manifest_template()
    assert not re.findall(r"__TPENV_[A-Z_]+__", text)
    # Without its Helm actions the stream is YAML; its objects are the install's, by kind and name.
    # (with one webhook namespace, "x": the else branch of `webhooks:` dropped, the ranges kept once)
    plain = re.sub(r"^\{\{- else \}\}\n.*\n", "", text, flags=re.M)
    plain = re.sub(r"^\{\{-[^}]*\}\}\n", "", plain, flags=re.M)  # lines of control actions (range, end, $ca)
    plain = re.sub(r"\{\{[^}]*\}\}", "x", plain)
    docs = [d for d in YAML(typ="safe").load_all(plain) if d]
    settings = Settings()
    settings.manager.webhook_namespaces = ["x"]
    installed = render_manager(settings, team_mode=False)
    # (sorted: the chart's per-namespace Roles come last, in a range; helm orders by kind anyway)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == \
        sorted((d["kind"], d["metadata"]["name"]) for d in installed)
    for expression in (".Values.agent.image", ".Values.teamMode", "range .Values.relay.cidrs", "genCA",
                       "range .Values.webhook.namespaces", "range $ns := .Values.webhook.namespaces"):
        assert expression in text


def test_values_are_documented_and_default_to_the_settings(tmp_path):
    values = YAML(typ="safe").load(values_yaml())
    defaults = Settings()
    assert values["agent"]["image"] == defaults.agent.image
    assert values["relay"]["port"] == defaults.manager.relay_port
    assert values["teamMode"] is False and values["relay"]["cidrs"] == []
    text = values_yaml()
    for key, (_, _, description) in VALUES.items():
        assert description in text, key
    assert YAML(typ="safe").load(chart_yaml())["name"] == "tpenv-manager"
    written = write_chart(tmp_path / "chart")
    assert sorted(p.relative_to(tmp_path / "chart").as_posix() for p in written) == \
        ["Chart.yaml", "templates/manager.yaml", "values.yaml"]
