"""Replace mode's bad input, before the cluster is asked: flags and telepresence.yaml."""
from __future__ import annotations

import pytest

from tpenv.cli.main import parse
from tpenv.cli.verbs.intercept import describe_text
from tpenv.config.flags import intercept_from_flags
from tpenv.config import load_config
from tpenv.errors import ConfigError, UsageError


def build(*argv: str):
    return intercept_from_flags(parse(["intercept", *argv]))


# --- stage 1: flags ---------------------------------------------------------------------------------

def test_replace_flag_sets_the_mode():
    assert build("web", "--replace").mode == "replace"
    assert build("web", "--replace", "--http-header", "all").mode == "replace"  # 'all' is every connection


def test_mirror_with_replace_names_both_flags():
    with pytest.raises(UsageError) as info:
        build("web", "--mirror", "--replace")
    assert str(info.value).startswith("--mirror and --replace cannot be combined")
    assert info.value.hint == "choose one of them"


@pytest.mark.parametrize("rule", [("--http-header", "x-dev=alice"), ("--http-header", "auto"),
                                  ("--http-path-prefix", "/api")])
def test_replace_with_a_rule_is_refused(rule):
    with pytest.raises(UsageError) as info:
        build("web", "--replace", *rule)
    assert str(info.value).startswith("--replace cannot be combined with --http-header/--http-path-*")


def test_describe_says_the_app_is_stopped():
    text = describe_text({"name": "web", "state": "ACTIVE", "workload_kind": "Deployment",
                          "destination": "127.0.0.1:8080", "service_port": "http", "mount_point": None,
                          "mode": "replace", "match": None})
    assert "Mode                   : replace (the app container is stopped; every port here)" in text


# --- stage 2: telepresence.yaml ---------------------------------------------------------------------

def test_mode_replace_in_the_file(tmp_path):
    path = tmp_path / "telepresence.yaml"
    path.write_text("intercepts:\n  - workload: web\n    port: 8080\n    mode: replace\n")
    assert load_config(path, environ={}).intercepts[0].mode == "replace"


def test_mode_replace_with_a_match_rule_is_located(tmp_path):
    path = tmp_path / "telepresence.yaml"
    path.write_text("intercepts:\n  - workload: web\n    port: 8080\n    mode: replace\n"
                    "    match:\n      headers: {x-dev: alice}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    (problem,) = info.value.problems
    assert (problem.line, problem.column) == (2, 5)
    assert "mode replace takes every connection of every port of the app" in problem.message


def test_unknown_mode_lists_replace(tmp_path):
    path = tmp_path / "telepresence.yaml"
    path.write_text("intercepts:\n  - workload: web\n    port: 8080\n    mode: replcae\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    (problem,) = info.value.problems
    assert (problem.line, problem.column) == (4, 11) and "replace" in str(problem)
