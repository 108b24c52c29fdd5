"""tpenv connect in env mode from this machine (the relay reached through the API server's
port-forward): ``tpenv connect -- CMD`` with the proxy variables, the background session with
``tpenv status`` and ``tpenv quit``, and bad input refused before anything starts.

This machine cannot reach the cluster's ranges by itself (docs/cluster.md "Network safety"), so
each request is shown to fail before connect and after quit, and to work in between.
Cluster-wide (manager install): run under flock /tmp/tpenv-clusterwide.lock.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from connect_kit import curl, deploy_apps, manager  # noqa: F401  (module fixture)
from test_intercept_kit import tpenv_env
from test_webhook_injection import agent_image, cli_env  # noqa: F401  (module fixtures, reused)
from tests.cluster.pytest_plugin import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def tpenv(workdir: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpenv.cli.main", *args], capture_output=True, text=True,
                          env=tpenv_env(workdir / "state"), timeout=timeout, cwd=workdir)


def network_state() -> str:
    """What a connect could change on this machine: routes, rules, links, nftables tables. The
    cluster's pods come and go on this shared machine (their veth links and routes), so those are
    left out: tpenv never touches them."""
    def run(*cmd: str) -> list[str]:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()

    routes = [r for r in run("ip", "route", "show", "table", "all") if "veth" not in r and not r.startswith("fe80::")]
    links = [line.split(":")[1].strip().split("@")[0] for line in run("ip", "-o", "link")]
    return "\n".join([*routes, *run("ip", "rule"), *(n for n in links if not n.startswith("veth")),
                      *run("nft", "list", "tables")])


def connect_sessions(workdir: Path) -> list[str]:
    state = workdir / "state"
    return sorted(p.name for p in state.glob("connect-*.json")) if state.is_dir() else []


SCRIPT = r"""
set -u
for url in "$@"; do
  case "$url" in
    https://*) printf '%s %s\n' "$url" "$(curl -sk --max-time 10 -o /dev/null -w '%{http_code}' "$url")" ;;
    *) printf '%s %s\n' "$url" "$(curl -s --max-time 10 "$url" | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])' 2>/dev/null)" ;;
  esac
done
"""


def test_connect_command_reaches_the_cluster_by_name_and_address(manager, namespace, tmp_path):
    ns = namespace
    apps = deploy_apps(ns)
    urls = [f"http://hello/{1}", f"http://hello.{ns}/{2}", f"http://hello.{ns}.svc.cluster.local/{3}",
            f"http://{apps['cluster_ip']}/{4}", f"http://{apps['pod_ip']}:8080/{5}", f"http://web-0.web.{ns}:8080/{6}"]

    # -- stage 1: without tpenv this machine reaches none of it --------------------------------------
    assert curl(f"http://{apps['cluster_ip']}/").returncode != 0
    before = network_state()

    # -- stage 2: connected for one command (env mode: ALL_PROXY, HTTP(S)_PROXY) ------------------------
    cp = tpenv(tmp_path, "connect", "--mode", "env", "-n", ns, "--", "sh", "-c", SCRIPT, "sh", *urls,
               "https://kubernetes.default/version")
    assert cp.returncode == 0, cp.stderr
    assert f"namespace {ns} (https://" in cp.stderr and "mode env" in cp.stderr
    answers = dict(line.split(" ", 1) for line in cp.stdout.splitlines())
    for i, url in enumerate(urls, 1):
        assert answers[url] == f"/{i}", (url, cp.stdout, cp.stderr)
    assert answers["https://kubernetes.default/version"] in ("200", "401", "403"), cp.stdout  # the API server answered

    # -- stage 3: after it, nothing is left: no route, no session, still unreachable -------------------
    assert network_state() == before
    assert connect_sessions(tmp_path) == []
    assert curl(f"http://{apps['cluster_ip']}/").returncode != 0


def test_background_session_status_and_quit(manager, namespace, tmp_path):
    ns = namespace
    apps = deploy_apps(ns)

    # -- stage 1: connect returns once connected, as Telepresence does -----------------------------
    cp = tpenv(tmp_path, "connect", "--mode", "env", "-n", ns)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    first = cp.stdout.splitlines()[0]
    assert first.startswith("Connected to context ") and f", namespace {ns} (https://" in first, cp.stdout
    try:
        # -- stage 2: status shows the connection ----------------------------------------------------
        st = json.loads(tpenv(tmp_path, "status", "-o", "json").stdout)["sessions"][0]
        conn = wait_until("the connection in status", lambda: json.loads(
            tpenv(tmp_path, "status", "-o", "json").stdout)["sessions"][0].get("connection", {}).get("proxy"), 30)
        conn = json.loads(tpenv(tmp_path, "status", "-o", "json").stdout)["sessions"][0]["connection"]
        assert st["session"]["id"].startswith("connect-")
        assert conn["mode"] == "env" and conn["namespace"] == ns and "10.96.0.0/16" in conn["cidrs"]
        assert "cluster.local" in conn["dns_suffixes"] and isinstance(conn["relay_round_trip_ms"], float)
        text = tpenv(tmp_path, "status").stdout
        assert "connection: " in text and "relay round trip: " in text and "proxied: " in text

        # -- stage 3: its proxy reaches the cluster by name --------------------------------------------
        got = curl("-x", f"socks5h://{conn['proxy']}", f"http://hello.{ns}/bg")
        assert got.returncode == 0 and json.loads(got.stdout)["path"] == "/bg", got.stderr
        got = curl("-x", f"http://{conn['proxy']}", f"http://{apps['cluster_ip']}/bg2")
        assert got.returncode == 0 and json.loads(got.stdout)["path"] == "/bg2", got.stderr
    finally:
        # -- stage 4: quit says Disconnected; the proxy is gone --------------------------------------
        cp = tpenv(tmp_path, "quit")
    assert cp.returncode == 0 and cp.stdout.splitlines()[0] == "Disconnected", cp.stdout + cp.stderr
    assert "nothing was left behind" in cp.stdout  # env mode changes nothing on the host
    assert connect_sessions(tmp_path) == []
    assert curl("-x", f"socks5h://{conn['proxy']}", f"http://hello.{ns}/").returncode != 0
    assert tpenv(tmp_path, "quit").stdout.startswith("Disconnected")


def test_bad_input_is_refused_where_written_and_changes_nothing(manager, namespace, tmp_path):
    ns = namespace
    before = network_state()

    # -- stage 1: flags: the flag is named, exit 2 --------------------------------------------------
    cp = tpenv(tmp_path, "connect", "-n", ns, "--mapped-namespaces", f"{ns},no-such-ns")
    assert cp.returncode == 2 and "--mapped-namespaces no-such-ns: no such namespace" in cp.stderr, cp.stderr
    cp = tpenv(tmp_path, "connect", "-n", ns, "--also-proxy", "10.300.0.0/16")
    assert cp.returncode == 2 and "--also-proxy: '10.300.0.0/16' is not a CIDR" in cp.stderr, cp.stderr
    cp = tpenv(tmp_path, "connect", "-n", ns, "--never-proxy", "10.0.0.0/8,nope")
    assert cp.returncode == 2 and "--never-proxy: 'nope' is not a CIDR" in cp.stderr, cp.stderr

    # -- stage 2: the file: file:line:column -------------------------------------------------------
    (tmp_path / "telepresence.yaml").write_text(f"namespace: {ns}\nconnect:\n  mode: env\n"
                                                "  mapped_namespaces:\n    - no-such-ns\n")
    cp = tpenv(tmp_path, "connect")
    assert cp.returncode == 2 and "telepresence.yaml:5:7: no namespace 'no-such-ns' in the cluster" in cp.stderr, \
        cp.stderr
    (tmp_path / "telepresence.yaml").write_text(f"namespace: {ns}\nconnect:\n  never_proxy: [10.96.0.0/33]\n")
    cp = tpenv(tmp_path, "connect")
    assert cp.returncode == 2 and "telepresence.yaml:3:17: connect.never_proxy[0]: '10.96.0.0/33' is not a CIDR" \
        in cp.stderr, cp.stderr

    # -- stage 3: nothing started, nothing changed ----------------------------------------------------
    assert connect_sessions(tmp_path) == []
    assert network_state() == before
    assert not [p for p in os.listdir(tmp_path / "state") if p.endswith(".sock")] if (tmp_path / "state").is_dir() else True
