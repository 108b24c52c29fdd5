"""Team mode in the client (issue 4) and the flags and keys that come with it and with sync mode.

Stages: the defaulting (match × team mode → the rule registered); the ConfigMap's value; `match:
all` / `--http-header all` and `mount.mode` / `--mount-mode` from the file and from the flags;
the text the intercept prints.
"""
from __future__ import annotations

import pytest

from tpenv.cli.main import parse
from tpenv.cli.verbs.intercept import describe_text
from tpenv.config.flags import intercept_from_flags
from tpenv.config.models import PERSONAL_HEADER, Intercept, Match
from tpenv.engine.teammode import defaulted, effective_match, parse_team_mode
from tpenv.errors import UsageError

RULE = Match(headers={"x-dev": "alice"})


# --- stage 1: the defaulting ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("match, team, expected, by_default", [
    (None, False, None, False),                        # no rule, no team mode: all TCP
    (None, True, Match(headers="auto"), True),         # no rule, team mode: the personal header
    ("all", False, None, False),                       # all: all TCP
    ("all", True, None, False),                        # ... also in team mode
    (RULE, False, RULE, False),                        # a rule is itself
    (RULE, True, RULE, False),
    (Match(headers="auto"), True, Match(headers="auto"), False),
])
def test_effective_match(match, team, expected, by_default):
    assert effective_match(match, team) == expected
    assert defaulted(match, team) is by_default


def test_team_default_registers_the_personal_header_of_the_intercept():
    m = effective_match(None, True)
    assert m.wire("sess1:web") == {"headers": {PERSONAL_HEADER: "sess1:web"}, "path": None}


@pytest.mark.parametrize("cm, on", [
    (None, False), ({}, False), ({"data": None}, False), ({"data": {"team_mode": "false"}}, False),
    ({"data": {"team_mode": "true"}}, True), ({"data": {"team_mode": "True"}}, False),
])
def test_configmap_value(cm, on):
    assert parse_team_mode(cm) is on


# --- stage 2: match: all and mount.mode in the file -----------------------------------------------------------------

def test_match_all_and_mount_mode_in_the_file():
    ic = Intercept.model_validate({"workload": "w", "port": 1, "match": "all", "mount": {"path": "v", "mode": "sync"}})
    assert ic.match == "all" and ic.mount.mode == "sync"
    assert Intercept.model_validate({"workload": "w", "port": 1}).mount.mode == "auto"


def test_bad_match_and_mode_are_refused_with_the_choices(tmp_path):
    from tpenv.config.loader import load_config
    from tpenv.errors import ConfigError

    f = tmp_path / "telepresence.yaml"
    f.write_text("intercepts:\n  - {workload: w, port: 1, match: everything, mount: {mode: snc}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    text = str(err.value)
    assert "intercepts[0].match: 'everything' is not one of 'all'" in text
    assert "intercepts[0].mount.mode: 'snc' is not one of 'auto', 'sshfs', 'sync' (did you mean 'sync'?)" in text


# --- stage 3: the flags ---------------------------------------------------------------------------------------------

def build(*argv: str) -> Intercept:
    return intercept_from_flags(parse(["intercept", *argv]))  # the one builder the verb uses


def test_http_header_all_and_mount_mode_flags():
    ic = build("web", "--http-header", "all", "--mount", "/tmp/v", "--mount-mode", "sync")
    assert ic.match == "all" and ic.mount.mode == "sync" and ic.mount.path == "/tmp/v"
    plain = build("web")
    assert plain.match is None and plain.mount.mode == "auto" and plain.mount.path is True


@pytest.mark.parametrize("argv, message", [
    (["--http-header", "all", "--http-header", "x=y"], "--http-header"),
    (["--http-header", "all", "--http-path-prefix", "/api"], "cannot be combined with --http-path"),
    (["--mount", "false", "--mount-mode", "sync"], "--mount-mode needs a mount"),
])
def test_contradicting_flags_are_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        build("web", *argv)


def test_mount_mode_choices_are_checked_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse(["intercept", "web", "--mount-mode", "fuse"])
    assert "invalid choice: 'fuse'" in capsys.readouterr().err


# --- stage 4: what the intercept prints -----------------------------------------------------------------------------

def test_the_intercepting_line_says_team_mode_chose_the_header():
    d = {"name": "web", "state": "ACTIVE", "workload_kind": "Deployment", "destination": "127.0.0.1:8080",
         "service_port": "http", "mount_point": None,
         "match": {"headers": {PERSONAL_HEADER: "s:web"}, "path": None}, "team_mode_default": True}
    text = describe_text(d)
    assert f"header('{PERSONAL_HEADER}') ~ /s:web/ (team mode default)" in text
    assert "(team mode default)" not in describe_text({**d, "team_mode_default": False})
