"""The `connect:` section: today's values keep working, the new fields are checked where they are
written (file:line:column), and the older names map onto the new ones."""
from pathlib import Path

import pytest

from tpenv.config import load_config
from tpenv.errors import ConfigError


def load(tmp_path: Path, text: str):
    path = tmp_path / "telepresence.yaml"
    path.write_text(text)
    return load_config(path, environ={})


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "telepresence.yaml"
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return [str(p).replace(str(path), "F") for p in info.value.problems]


# --- stage 1: files written for the older fields keep working ---------------------------------------------------

@pytest.mark.parametrize("mode,capture", [("auto", "auto"), ("root", "host"), ("rootless", "ns"), ("off", "off"),
                                          ("host", "host"), ("ns", "ns"), ("env", "env")])
def test_modes_old_and_new(tmp_path, mode, capture):
    assert load(tmp_path, f"connect:\n  mode: {mode}\n").connect.capture == capture


def test_namespaces_is_the_older_name_of_mapped_namespaces(tmp_path):
    assert load(tmp_path, "connect:\n  namespaces: [a, b]\n").connect.mapped == ["a", "b"]
    assert load(tmp_path, "connect:\n  mapped_namespaces: [c]\n").connect.mapped == ["c"]
    assert load(tmp_path, "connect: {}\n").connect.mapped == []


def test_defaults(tmp_path):
    c = load(tmp_path, "connect: {}\n").connect
    assert c.excluded_suffixes == [".com", ".io", ".net", ".org", ".arpa", ".ru"]
    assert (c.also_proxy, c.never_proxy, c.allow_conflicting_subnets) == ([], [], False)


# --- stage 2: bad input, located --------------------------------------------------------------------------------

def test_invalid_cidr_is_located(tmp_path):
    [p] = problems(tmp_path, "connect:\n  also_proxy:\n    - 10.0.0.0/8\n    - 10.300.0.0/16\n")
    assert p.startswith("F:4:7: ") and "'10.300.0.0/16' is not a CIDR" in p


def test_unknown_mode_and_both_namespace_lists(tmp_path):
    [p] = problems(tmp_path, "connect:\n  mode: tun\n")
    assert p.startswith("F:2:9: ")
    [p] = problems(tmp_path, "connect:\n  namespaces: [a]\n  mapped_namespaces: [b]\n")
    assert "not both" in p and p.startswith("F:1:1: connect: ")  # the section that holds both


def test_bad_namespace_name_and_suffix(tmp_path):
    [p] = problems(tmp_path, "connect:\n  mapped_namespaces: [Shop]\n")
    assert p.startswith("F:2:23: ") and "not a valid" in p
    [p] = problems(tmp_path, "connect:\n  excluded_suffixes: ['.c om']\n")
    assert p.startswith("F:2:23: ") and "not a DNS suffix" in p
