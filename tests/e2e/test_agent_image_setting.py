"""The agent image reference is a setting three ways (issue 4): the file's `agent:` section, the
environment (TPENV_AGENT_IMAGE), the --agent-image flag; the flag wins, then the environment,
then the file. Checked on what lands in the cluster: the injected container's image.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.pytest_plugin import kubectl_json
from tests.e2e.test_intercept_kit import agent_image, deploy_hello, tpenv

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


def intercept_once(work: Path, ns: str, *flags: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`tpenv intercept hello ... -- true`: inject, intercept, run `true`, leave."""
    cp = subprocess.run([sys.executable, "-m", "tpenv.cli.main", "intercept", "hello", "--port", "18999",
                         "--mount", "false", "-n", ns, *flags, "--", "true"],
                        capture_output=True, text=True, env=env, cwd=work, timeout=240)
    assert cp.returncode == 0, f"exit {cp.returncode}\nstdout: {cp.stdout}\nstderr: {cp.stderr}"
    return cp


def agent_container(ns: str) -> dict:
    spec = kubectl_json("get", "deployment", "hello", ns=ns)["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "tpenv-agent")


def test_agent_image_from_file_env_and_flag(namespace, tmp_path):
    ns = namespace
    deploy_hello(ns)
    ref = agent_image()  # the image of this checkout, imported into the cluster
    alias = "tpenv/agent:dev"  # the same import's other tag
    base = {k: v for k, v in os.environ.items() if not k.startswith("TPENV_AGENT_")}
    base.update(TPENV_SESSION_STATE_DIR=str(tmp_path / "state"), TPENV_KUBE_ROLLOUT_TIMEOUT="120")

    # Stage 1: only the file names the image (and the pull policy): the injected agent runs it.
    (tmp_path / "telepresence.yaml").write_text(
        f"apiVersion: tpenv/v1\nagent:\n  image: {ref}\n  image_pull_policy: Never\n")
    intercept_once(tmp_path, ns, env=base)
    c = agent_container(ns)
    assert (c["image"], c["imagePullPolicy"]) == (ref, "Never")

    # Stage 2: the environment beats the file; the agent is replaced by the new image.
    tpenv(tmp_path, "uninstall", "--agent", "hello", "-n", ns)
    intercept_once(tmp_path, ns, env={**base, "TPENV_AGENT_IMAGE": alias})
    assert agent_container(ns)["image"] == alias

    # Stage 3: the flag beats both.
    tpenv(tmp_path, "uninstall", "--agent", "hello", "-n", ns)
    intercept_once(tmp_path, ns, "--agent-image", ref, env={**base, "TPENV_AGENT_IMAGE": alias})
    assert agent_container(ns)["image"] == ref

    # Stage 4: a file that does not load does not stop an intercept: one warning names it.
    (tmp_path / "telepresence.yaml").write_text("apiVersion: tpenv/v1\nagent:\n  image: [not, a, string]\n")
    cp = intercept_once(tmp_path, ns, "--agent-image", ref, env=base)
    assert "warning: telepresence.yaml: not read" in cp.stderr and "agent: section does not apply" in cp.stderr
    tpenv(tmp_path, "uninstall", "--agent", "hello", "-n", ns)
