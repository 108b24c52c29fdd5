"""Shell completion, driven through the real shells: bash calls the function `complete -F`
registered (COMP_WORDS/COMP_CWORD as bash sets them), fish answers `complete -C`, zsh parses
its script. Cluster values (workload names) are in tests/e2e/test_completion.py.

bash, zsh and fish come from `devspace.py test` (TEST_PACKAGES)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tpenv.cli.completion import candidates
from tpenv.cli.main import build_parser

BIN = Path(sys.executable).parent


def shell(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install {name} (python3 devspace.py test installs it)",
                    pytrace=False)
    return path


def env(tmp_path: Path) -> dict[str, str]:
    # tpenv from this venv first; no cluster (a kubeconfig that does not exist).
    return {"PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none"),
            "TPENV_SESSION_STATE_DIR": str(tmp_path / "sessions")}


def bash_complete(line: str, tmp_path: Path) -> list[str]:
    """What bash offers for TAB at the end of ``line`` (a trailing space: a new, empty word)."""
    words = line.split() + ([""] if line.endswith(" ") else [])
    quoted = " ".join(f"'{w}'" for w in words)
    script = (f"source <(tpenv completion bash)\nCOMP_WORDS=({quoted})\nCOMP_CWORD={len(words) - 1}\n"
              f"COMP_LINE='{line}'\nCOMP_POINT={len(line)}\n_tpenv\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    cp = subprocess.run([shell("bash"), "-c", script], env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    return [w for w in cp.stdout.splitlines() if w]


# --- stage 1: bash, as a user presses TAB ---------------------------------------------------------------------------

@pytest.mark.parametrize("line,expected", [
    ("tpenv inter", ["intercept"]),
    ("tpenv d", ["down", "doctor"]),
    ("tpenv doctor --f", ["--file", "--fix"]),
    ("tpenv intercept hello --mount-mode ", ["auto", "sshfs", "sync"]),
    ("tpenv -o y", ["yaml"]),
    ("tpenv manager up", ["upgrade"]),
    ("tpenv completion ", ["bash", "zsh", "fish"]),
    ("tpenv intercept hello -- py", []),  # the command to run: bash's default (files) takes over
])
def test_bash_completes_verbs_flags_and_choices(line, expected, tmp_path):
    assert bash_complete(line, tmp_path) == expected


def test_bash_completion_of_workloads_without_a_cluster_offers_nothing_quickly(tmp_path):
    assert bash_complete("tpenv intercept ", tmp_path) == []


# --- stage 2: fish and zsh ------------------------------------------------------------------------------------------

def test_fish_completes_through_the_same_helper(tmp_path):
    cp = subprocess.run([shell("fish"), "--no-config", "-c",
                         "tpenv completion fish | source; complete -C 'tpenv intercept x --env-syntax c'"],
                        env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert [line.split("\t")[0] for line in cp.stdout.splitlines()] == ["compose"]


def test_zsh_script_parses_and_registers(tmp_path):
    script = subprocess.run([str(BIN / "tpenv"), "completion", "zsh"], env=env(tmp_path), capture_output=True,
                            text=True, timeout=60).stdout
    (tmp_path / "_tpenv").write_text(script)
    cp = subprocess.run([shell("zsh"), "-f", "-c", f"autoload -Uz compinit && compinit -u -D && "
                                                   f"source {tmp_path / '_tpenv'} && whence -w _tpenv"],
                        env=env(tmp_path), capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0 and "_tpenv: function" in cp.stdout, cp.stderr


# --- stage 3: the helper alone and the kubectl plugin's completion --------------------------------------------------

def test_candidates_skip_flag_values_when_finding_the_verb():
    parser = build_parser()
    assert candidates(parser, ["tpenv", "-n", "ns", "-f", "x.yaml", "uni"], 5) == ["uninstall"]
    assert candidates(parser, ["tpenv", "uninstall", "--all"], 2) == ["--all-agents"]


def test_kubectl_plugin_completion_speaks_cobra(tmp_path):
    cp = subprocess.run([str(BIN / "kubectl_complete-tpenv"), "manager", "un"], env=env(tmp_path),
                        capture_output=True, text=True, timeout=60)
    assert cp.stdout.splitlines() == ["uninstall", ":4"]
