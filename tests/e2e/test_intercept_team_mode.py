"""Issue 4, team mode: with the manager's ConfigMap saying ``team_mode: "true"``, `tpenv intercept`
without header flags takes only the requests carrying the personal header; `--http-header all`
still takes everything.

Team mode is cluster-wide and other tests run at the same time: the ConfigMap is made exactly as
`tpenv manager install --team-mode` renders it (its --dry-run output), only for the seconds an
intercept takes to start (the client reads it once, at start), and put back as it was. The agent
is injected beforehand by a run that does not read team mode, so those seconds stay few.
"""
from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator

import pytest

from test_intercept_kit import Intercepting, LocalServer, client_pod, curl, deploy_hello, tpenv, wait_for
from tests.cluster.pytest_plugin import kubectl

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

HEADER = "x-telepresence-intercept-id"


def _configmap() -> dict | None:
    cp = kubectl("get", "configmap", "tpenv-manager", "-o", "json", ns="tpenv", check=False)
    return json.loads(cp.stdout) if cp.returncode == 0 else None


class TeamMode:
    """Team mode switched on in the cluster for short windows: ``with team.on(): ...``; ``close()``
    removes the namespace tpenv if this test made it (kept meanwhile: a namespace being deleted
    refuses new objects)."""

    def __init__(self, tmp_path) -> None:
        docs = json.loads(tpenv(tmp_path, "-o", "json", "manager", "install", "--team-mode", "--dry-run").stdout)
        self.cm = next(d for d in docs if d["kind"] == "ConfigMap")
        assert self.cm["data"]["team_mode"] == "true"
        self.made_ns = kubectl("get", "namespace", "tpenv", check=False).returncode != 0
        if self.made_ns:
            kubectl("create", "-f", "-", input=json.dumps(next(d for d in docs if d["kind"] == "Namespace")))

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        before = _configmap()
        if before is None:
            out = kubectl("create", "-o", "json", "-f", "-", ns="tpenv", input=json.dumps(self.cm)).stdout
        else:
            out = kubectl("patch", "configmap", "tpenv-manager", "--type", "merge", "-o", "json", "-p",
                          json.dumps({"data": {"team_mode": "true"}}), ns="tpenv").stdout
        mine = json.loads(out)["metadata"]["resourceVersion"]
        try:
            yield
        finally:
            self._put_back(before, mine)

    @staticmethod
    def _put_back(before: dict | None, mine: str) -> None:
        """The ConfigMap as it was, unless someone changed it meanwhile (theirs then)."""
        now = _configmap()
        if now is None or now["metadata"]["resourceVersion"] != mine:
            warnings.warn("ConfigMap tpenv/tpenv-manager changed by someone else during the test: left as it is")
        elif before is None:
            kubectl("delete", "configmap", "tpenv-manager", "--ignore-not-found", ns="tpenv")
        else:
            obj = {k: v for k, v in before.items() if k != "status"}
            obj["metadata"] = {k: v for k, v in before["metadata"].items() if k != "managedFields"}
            obj["metadata"]["resourceVersion"] = mine
            kubectl("replace", "-f", "-", ns="tpenv", input=json.dumps(obj))

    def close(self) -> None:
        if self.made_ns and _configmap() is None:
            kubectl("delete", "namespace", "tpenv", "--wait=false", "--ignore-not-found")


def source(body: str) -> str:
    try:
        return json.loads(body)["source"]
    except ValueError:
        return body


def test_team_mode_makes_personal_intercepts_the_default(namespace, tmp_path):
    ns = namespace
    deploy_hello(ns)
    client_pod(ns)
    local = LocalServer("laptop")
    before = _configmap()
    # The agent, injected by a run with a rule of its own (which never reads team mode).
    tpenv(tmp_path, "intercept", "hello", "--port", str(local.port), "--http-header", "x-warmup=1",
          "--mount", "false", "-n", ns, "--", "true", timeout=300)
    team = TeamMode(tmp_path)
    try:
        # Stage 1: team mode on; no header flag: the personal header, and the output says so.
        with team.on():
            run = Intercepting(tmp_path, "hello", "--port", str(local.port), "--mount", "false", "-n", ns)
            info = run.ready()
        try:
            assert info["match"]["headers"] == {HEADER: re.escape(info["id"])} and info["team_mode_default"]
            assert "team mode: personal intercept by default; `--http-header all` / `match: all` for all traffic" \
                in "".join(run.stderr)

            # Stage 2: a request with the header reaches the laptop; one without stays in the cluster.
            wait_for("the laptop's answer to the personal header",
                     lambda: curl(ns, f"http://hello.{ns}/", f"{HEADER}: {info['id']}") == "laptop", 60)
            assert source(curl(ns, f"http://hello.{ns}/")) == "cluster"
            assert source(curl(ns, f"http://hello.{ns}/", f"{HEADER}: someone-else:hello")) == "cluster"
        finally:
            assert run.stop() == 0, "".join(run.stderr)

        # Stage 3: team mode on, --http-header all: everything comes to the laptop.
        with team.on():
            run = Intercepting(tmp_path, "hello", "--port", str(local.port), "--http-header", "all", "--mount",
                               "false", "-n", ns)
            info = run.ready()
        try:
            assert info["match"] is None and not info["team_mode_default"]
            assert "team mode" not in "".join(run.stderr)
            wait_for("the laptop's answer to a plain request", lambda: curl(ns, f"http://hello.{ns}/") == "laptop", 60)
        finally:
            assert run.stop() == 0, "".join(run.stderr)
    finally:
        team.close()
        local.close()
    # Stage 4: the ConfigMap is as it was.
    after = _configmap()
    assert (after or {}).get("data") == (before or {}).get("data")
