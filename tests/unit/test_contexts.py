"""`contexts:` (issue 20): entries found in a kubeconfig, the default chosen, errors located.

Pure logic over real files: a kubeconfig written to tmp_path, telepresence.yaml loaded by the real
loader; nothing talks to a cluster (the e2e tests in tests/e2e/test_up_contexts.py do)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tpenv.config import load_config
from tpenv.engine.contexts import resolve_targets
from tpenv.engine.forwards import ForwardSpec
from tpenv.engine.intercepts import intercept_key
from tpenv.errors import ConfigError, UsageError
from tpenv.kits.kubeconfig import Kubeconfig, same_server

SERVER = "https://127.0.0.1:6443"


def kubeconfig(path: Path, contexts: dict[str, tuple[str, str, str | None]], current: str | None = None) -> Kubeconfig:
    """A kubeconfig with ``name -> (cluster, server, namespace)`` contexts; read back."""
    clusters = {cluster: server for cluster, server, _ in contexts.values()}
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": current or next(iter(contexts)),
        "clusters": [{"name": c, "cluster": {"server": s}} for c, s in clusters.items()],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": n, "context": {"cluster": c, "user": "u", **({"namespace": ns} if ns else {})}}
                     for n, (c, _, ns) in contexts.items()]}))
    return Kubeconfig.read(str(path))


def config(tmp_path: Path, text: str):
    path = tmp_path / "telepresence.yaml"
    path.write_text(text)
    return load_config(path)


TWO = """\
apiVersion: tpenv/v1
contexts:
  admin:
    server: https://127.0.0.1:6443/
  limited:
    contexts: [ci-bot, laptop-sa]
    namespace: team
intercepts:
  - workload: web
    context: admin
    namespace: apps
    port: 8080:80
forwards:
  - service: db
    context: limited
    port: 5432
"""


def test_server_url_and_candidate_names_find_one_context_each(tmp_path):
    # -- stage 1: a kubeconfig with two clusters whose context names the file never mentions ----
    kc = kubeconfig(tmp_path / "kc", {"laptop-admin": ("local", SERVER, None),
                                      "laptop-sa": ("proxied", "https://127.0.0.1:7000", "team")})
    # -- stage 2: each entry resolves to its own kubeconfig context, with its namespace ----------
    targets = resolve_targets(config(tmp_path, TWO), kubeconfig=kc)
    assert targets.named["admin"].kube_context == "laptop-admin"
    assert (targets.named["limited"].kube_context, targets.named["limited"].namespace) == ("laptop-sa", "team")
    assert targets.default.name == "admin"  # no default: true: the first entry


def test_server_urls_compare_as_urls():
    assert same_server("https://API.example.com:443/", "https://api.example.com")
    assert same_server("http://h", "http://h:80")
    assert not same_server("https://h:6443", "https://h:6444")


def test_context_flag_and_default_choose_the_default(tmp_path):
    kc = kubeconfig(tmp_path / "kc", {"laptop-admin": ("local", SERVER, None),
                                      "laptop-sa": ("proxied", "https://127.0.0.1:7000", "team")})
    cfg = config(tmp_path, TWO.replace("    namespace: team\n", "    namespace: team\n    default: true\n"))
    assert resolve_targets(cfg, kubeconfig=kc).default.name == "limited"
    assert resolve_targets(cfg, selected="admin", kubeconfig=kc).default.name == "admin"
    # A kubeconfig context that is no entry: units naming no context go there as they are.
    by_kc = resolve_targets(cfg, selected="laptop-sa", kubeconfig=kc).default
    assert (by_kc.name, by_kc.kube_context) == ("laptop-sa", "laptop-sa")
    with pytest.raises(UsageError) as e:
        resolve_targets(cfg, selected="nope", selected_by="TPENV_CONTEXT", kubeconfig=kc)
    assert "TPENV_CONTEXT 'nope'" in e.value.message
    assert "admin, limited" in e.value.message and "laptop-admin, laptop-sa" in e.value.message


def test_an_entry_matching_nothing_or_two_is_located_with_the_contexts_there_are(tmp_path):
    # -- stage 1: both kubeconfig contexts point at one server, and no candidate name exists ----
    kc = kubeconfig(tmp_path / "kc", {"laptop-admin": ("local", SERVER, None),
                                      "laptop-sa": ("local", SERVER, "team")})
    cfg = config(tmp_path, TWO.replace("ci-bot, laptop-sa", "ci-bot"))
    # -- stage 2: one problem per entry, at the entry's key, naming what the kubeconfig has -----
    with pytest.raises(ConfigError) as e:
        resolve_targets(cfg, kubeconfig=kc)
    problems = {p.line: p for p in e.value.problems}
    assert set(problems) == {3, 5}, e.value.message
    assert problems[3].column == 3 and "2 contexts of your kubeconfig match" in problems[3].message
    assert "match (server https://127.0.0.1:6443/): laptop-admin, laptop-sa; your kubeconfig has: " \
        "laptop-admin (cluster local, server https://127.0.0.1:6443)" in problems[3].message
    assert "no context of your kubeconfig matches (contexts [ci-bot])" in problems[5].message
    assert "your kubeconfig has: laptop-admin (cluster local" in problems[5].message
    assert str(problems[5]).startswith(f"{tmp_path / 'telepresence.yaml'}:5:3: contexts.limited")


def test_entries_no_unit_uses_need_not_resolve(tmp_path):
    kc = kubeconfig(tmp_path / "kc", {"laptop-admin": ("local", SERVER, None)})
    cfg = config(tmp_path, TWO)
    targets = resolve_targets(cfg, units=cfg.intercepts, kubeconfig=kc)  # `--only web`
    assert set(targets.named) == {"admin"}


def test_a_file_without_contexts_keeps_one_unnamed_context(tmp_path):
    cfg = config(tmp_path, "context: kind-dev\nforwards: [{service: db, port: 5432}]\n")
    t = resolve_targets(cfg)
    assert (t.default.name, t.default.kube_context) == (None, "kind-dev")
    assert resolve_targets(cfg, selected="other").default.kube_context == "other"


def test_units_naming_undeclared_contexts_are_located(tmp_path):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, TWO.replace("context: limited", "context: limted"))
    (p,) = e.value.problems
    assert (p.line, p.column) == (15, 14)
    assert "no context 'limted' in contexts: (declared: admin, limited)" in p.message
    assert p.suggestion == "did you mean 'limited'?"
    with pytest.raises(ConfigError) as e:
        config(tmp_path, "forwards: [{service: db, port: 5432, context: prod}]\n")
    assert "the file declares no contexts:" in e.value.problems[0].message


@pytest.mark.parametrize("text, expected", [
    ("context: a\ncontexts: {b: {server: https://h}}\n", "either context"),
    ("contexts: {b: {namespace: x}}\n", "at least one of server, cluster, contexts"),
    ("contexts: {a: {server: https://h, default: true}, b: {server: https://i, default: true}}\n", "at most one"),
    ("contexts: {Bad_Name: {server: https://h}}\n", "not a valid context name"),
])
def test_bad_entries_are_refused(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, text)
    assert expected in e.value.message


def test_unit_keys_carry_the_context_only_in_files_with_contexts():
    assert intercept_key("ns", "web", "8080:80") == ("intercept", "ns", "web", "8080:80")
    assert intercept_key("ns", "web", "8080:80", "staging")[-1] == "staging"
    a = ForwardSpec(None, "ns", "db", 5432, 5432, context="a")
    b = ForwardSpec(None, "ns", "db", 5432, 15432, context="b")
    assert a.key != b.key and ForwardSpec(None, "ns", "db", 5432, 1).key == ("forward", "ns", "db", "5432")


def test_one_cluster_verbs_find_the_files_entries_in_the_kubeconfig(tmp_path, monkeypatch):
    # `tpenv list --context team` (or TPENV_CONTEXT=team) in a project with contexts: is my-sa here.
    from tpenv.cli.context import CliContext
    from tpenv.settings import load_settings

    kubeconfig(tmp_path / "kc", {"laptop-admin": ("local", SERVER, None),
                                 "laptop-sa": ("proxied", "https://127.0.0.1:7000", "team")})
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kc"))
    config(tmp_path, TWO)
    ctx = CliContext(settings=load_settings({}), config_file=tmp_path / "telepresence.yaml")
    assert ctx.cluster_context() == "laptop-admin"  # the file's default entry
    assert ctx.cluster_target() == ("laptop-admin", None)  # no namespace in it nor in the file: the kube context's
    ctx.kube_context = "limited"
    assert ctx.cluster_context() == "laptop-sa"
    # `tpenv list` lists the namespace a unit naming none would use: the entry's, else the file's
    assert ctx.cluster_target() == ("laptop-sa", "team")
    config(tmp_path, "namespace: file-ns\n" + TWO)
    assert ctx.cluster_target() == ("laptop-sa", "team")
    ctx.kube_context = None
    assert ctx.cluster_target() == ("laptop-admin", "file-ns")
    config(tmp_path, TWO)
    ctx.kube_context = "limited"
    ctx.kube_context = "laptop-admin"  # a kubeconfig context is taken as it is
    assert ctx.cluster_context() == "laptop-admin"
    assert CliContext(settings=load_settings({}), config_file=tmp_path / "none.yaml",
                      kube_context="x").cluster_context() == "x"


def test_status_and_the_live_table_name_each_units_context():
    import io

    from rich.console import Console

    from tpenv.engine.liveview import render_units
    from tpenv.engine.up import format_status

    units = [{"name": "forward/b/db/80/team", "context": "team", "state": "ready", "since": 100.0, "restarts": 0,
              "detail": None, "last_error": None},
             {"name": "handler/web", "context": None, "state": "ready", "since": 100.0, "restarts": 0,
              "detail": "pid 7", "last_error": None}]
    out = io.StringIO()
    Console(file=out, width=140, color_system=None).print(render_units({"units": units}, now=110.0))
    lines = [line.split() for line in out.getvalue().splitlines()]
    assert lines[0][:2] == ["unit", "context"] and lines[1][:3] == ["forward/b/db/80/team", "team", "ready"]
    text = format_status([{"session": {"id": "s", "pid": 1}, "units": units}], now=110.0)
    assert "forward/b/db/80/team" in text and "context team" in text and text.count("context") == 1
