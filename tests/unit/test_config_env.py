"""The handler's env: rendering (set, rewrite, mount paths) and the four env-file formats, read back for real.

The sh format is read back by a real `bash`; docker's by a parser written to docker's documented
rules (the rest of the line after the first '=', verbatim); json by json; compose by python-dotenv
(PyPI) and by compose's quoting rules (for $$, which python-dotenv does not know).
"""
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpenv.config import load_config, render_env, write_env_file
from tpenv.config.models import Intercept
from tpenv.errors import PermanentError


def intercept(**fields) -> Intercept:
    return Intercept.model_validate({"workload": "web", "port": 8080, "namespace": "team", **fields})


# --- stage 1: rendering -------------------------------------------------------------------------------------------

def test_order_app_env_then_telepresence_then_set_then_rewrite():
    ic = intercept(env={"set": {"LOG": "debug", "DB_HOST": "db"},
                        "rewrite": {"DB_HOST": "{{ value }}.{{ namespace }}", "ID": "{{ intercept_id }}",
                                    "BOTH": "{{ env.DB_HOST }}|{{ name }}"}})
    env = render_env({"LOG": "info", "KEEP": "1"}, ic, None, "s1:web")
    assert env == {"LOG": "debug", "KEEP": "1", "DB_HOST": "db.team", "ID": "s1:web", "BOTH": "db.team|BOTH",
                   "TELEPRESENCE_INTERCEPT_ID": "s1:web"}


def test_mount_root_and_rewrite_env():
    ic = intercept(mount={"path": "./vol", "rewrite_env": ["TOKEN_FILE", "ABSENT"]},
                   env={"rewrite": {"CA": "{{ mount_root }}{{ value }}"}})
    env = render_env({"TOKEN_FILE": "/var/run/token", "CA": "/etc/ca.pem"}, ic, "/tmp/mnt", "s:web")
    assert env["TOKEN_FILE"] == "/tmp/mnt/var/run/token" and env["CA"] == "/tmp/mnt/etc/ca.pem"
    assert env["TELEPRESENCE_ROOT"] == "/tmp/mnt" and "ABSENT" not in env


def test_namespace_argument_overrides_the_intercepts(tmp_path):
    ic = intercept(env={"rewrite": {"NS": "{{ namespace }}"}})
    assert render_env({}, ic, None, "s:web", namespace="other")["NS"] == "other"


def test_templates_are_sandboxed(tmp_path):
    from tpenv.errors import ConfigError

    ic = intercept(env={"rewrite": {"X": "{{ value.__class__.__mro__ }}"}})
    with pytest.raises(ConfigError, match="SecurityError"):
        render_env({"X": "v"}, ic, None, "s:web")


# --- stage 2: writing and reading back ----------------------------------------------------------------------------

NASTY = {"PLAIN": "value", "SPACES": "  two  spaces  ", "QUOTES": "it's \"quoted\"", "DOLLAR": "$HOME ${X} $(id)",
         "BACKSLASH": r"C:\path\n", "EQUALS": "a=b=c", "EMPTY": "", "HASH": "#not a comment", "UNICODE": "héllo ✓",
         "BACKTICK": "`id`"}
MULTILINE = {"CERT": "-----BEGIN-----\nabc\n-----END-----\n", "CR": "a\rb"}


def read_sh(path: Path) -> dict[str, str]:
    out = subprocess.run(["bash", "-c", 'set -a; . "$1"; env -0', "bash", str(path)], env={},
                         capture_output=True, check=True).stdout.decode()
    env = dict(item.split("=", 1) for item in out.split("\0") if item)
    return {k: v for k, v in env.items() if k not in ("PWD", "SHLVL", "_", "OLDPWD")}


def read_dotenv(path: Path) -> dict[str, str]:
    # python-dotenv, a real reader of compose-style files. It differs from compose on one point
    # only: it knows no $$ (compose's literal $, which the writer uses inside double quotes), so
    # it reads without interpolation, and values needing $$ stay with read_compose below.
    from dotenv import dotenv_values

    return dict(dotenv_values(path, interpolate=False))


def read_docker(path: Path) -> dict[str, str]:
    # docker's opts.ParseEnvFile: lines are trimmed on the left, '#' lines and blank lines skipped,
    # the name is what precedes the first '=', the value the rest of the line verbatim.
    env = {}
    for line in path.read_text().split("\n"):
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        assert not re.search(r"\s", name)
        env[name] = value
    return env


def read_compose(path: Path) -> dict[str, str]:
    # compose .env: NAME='literal' or NAME="escaped" with \\ \" \n \r, and $$ for a literal $.
    env = {}
    for line in path.read_text().split("\n"):
        if not line:
            continue
        name, _, raw = line.partition("=")
        if raw.startswith("'"):
            assert raw.endswith("'") and "'" not in raw[1:-1]
            env[name] = raw[1:-1]
        else:
            assert raw.startswith('"') and raw.endswith('"')
            env[name] = re.sub(r'\\(.)|\$\$', lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1) or "$"),
                               raw[1:-1])
    return env


READERS = {"sh": read_sh, "docker": read_docker, "json": lambda p: json.loads(p.read_text()),
           "compose": read_compose}


@pytest.mark.parametrize("fmt", ["sh", "docker", "json", "compose"])
def test_round_trip(tmp_path, fmt):
    env = dict(NASTY) if fmt == "docker" else {**NASTY, **MULTILINE}
    path = tmp_path / f"app.{fmt}"
    write_env_file(env, path, fmt)
    assert READERS[fmt](path) == env
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # values are secrets


def test_docker_refuses_what_it_cannot_hold_and_names_only_the_variable(tmp_path):
    with pytest.raises(PermanentError) as info:
        write_env_file({"CERT": "secret\nvalue"}, tmp_path / "x.env", "docker")
    assert "CERT" in info.value.message and "secret" not in info.value.message
    assert not (tmp_path / "x.env").exists()


def test_sh_refuses_names_the_shell_cannot_set(tmp_path):
    with pytest.raises(PermanentError, match="a.b"):
        write_env_file({"a.b": "1"}, tmp_path / "x.sh", "sh")


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.from_regex(r"T_[A-Za-z0-9_]{0,10}", fullmatch=True),  # T_: never a shell's own variable
                       st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=30),
                       max_size=5))
def test_sh_round_trip_of_any_value(env):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "env.sh"
        write_env_file(env, path, "sh")
        assert read_sh(path) == env


def test_compose_file_is_read_by_python_dotenv(tmp_path):
    env = {**NASTY, **MULTILINE}
    write_env_file(env, tmp_path / "app.env", "compose")
    assert read_dotenv(tmp_path / "app.env") == env


def _needs_double_dollar(value: str) -> bool:
    return "$" in value and any(c in value for c in "'\n\r\\")  # double-quoted, so $ is written $$


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
                       st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=30)
                       .filter(lambda v: not _needs_double_dollar(v)), max_size=5))
def test_compose_round_trip_of_any_value_through_python_dotenv(env):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "app.env"
        write_env_file(env, path, "compose")
        assert read_dotenv(path) == env


# --- stage 3: the loaded example renders and writes ---------------------------------------------------------------

def test_hello_example_env(tmp_path):
    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "examples" / "hello" / "telepresence.yaml")
    ic = config.intercepts[0]
    env = render_env({"HOSTNAME": "hello-abc"}, ic, None, "s1:hello")
    assert env["PORT"] == "8080"
    write_env_file(env, tmp_path / "hello.env", ic.env.format)
    assert read_docker(tmp_path / "hello.env") == env
