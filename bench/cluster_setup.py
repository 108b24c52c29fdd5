"""The cluster side of a run: kubectl, the namespace's objects (the app, its two Services, the client
pod), and the agent image every `tpenv` the run starts is told to use."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import BENCH, REPO, log
from tests.kit.kubectl import kubectl_binary
from tests.kit.apps import testapp_image

SERVER = (BENCH / "server.py").read_text()

# The ports of the app pod. APP_PORT is the one bench-app targets, the one tpenv intercepts: the
# in-pod redirect (tpenv-init's PREROUTING rule) sends everything arriving there to the agent, even
# through another Service. So the baseline (a) dials DIRECT_PORT, the same server on a second
# port nothing redirects, and the compiled-proxy peer (e) dials HAPROXY_FRONT: HAProxy in a sidecar
# of the same pod, a plain TCP proxy to 127.0.0.1:APP_PORT, exactly the agent's hop, reached the
# agent's way too: nothing listens on HAPROXY_FRONT, a nat PREROUTING REDIRECT of the pod (the
# bench's own init container, the rule tpenv-init writes for the agent) sends it to HAPROXY_PORT.
# Before 2026-12-05, (e) was dialled on HAPROXY_PORT itself, so the agent's side alone paid the
# redirect's NAT on every packet (locally 0.5-1 us of proxy CPU per request, and as much again in
# the caller; docs/performance.md, "passthrough at the compiled proxy's speed").
APP_PORT, DIRECT_PORT, HAPROXY_PORT, HAPROXY_FRONT = 8080, 8081, 8082, 8083

# One thread, like the agent's one event loop: the pair compares two single-threaded userspace
# proxies on this hardware, whatever the core count. TCP mode: bytes relayed, no parsing. maxconn
# within the container's file limit (two descriptors a connection; it cannot raise it unprivileged).
HAPROXY_CFG = f"""global
    nbthread 1
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend bench
    bind :{HAPROXY_PORT}
    default_backend app
backend app
    server app 127.0.0.1:{APP_PORT}
"""


def kubectl(*args: str, ns: str | None = None, input: str | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
    cmd = [kubectl_binary(), *(["-n", ns] if ns else []), *args]
    cp = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args[:3])}: {cp.stderr.strip()[-500:]}")
    return cp


def kjson(*args: str, ns: str | None = None) -> Any:
    return json.loads(kubectl(*args, "-o", "json", ns=ns).stdout)


def redirect_container(image: str | None) -> dict:
    """The bench's init container: HAPROXY_FRONT -> HAPROXY_PORT, as tpenv-init redirects the app's
    port to the agent's (agent/tpenv_agent/redirect.py: iptables-nft, nat PREROUTING, REDIRECT; its
    own rule, not tpenv's chain, which tpenv-init flushes). The agent image: it has iptables-nft."""
    from tpenv.settings import load_settings

    return {"name": "bench-redirect", "image": image or load_settings({}).agent.image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["iptables-nft", "-w", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport",
                        str(HAPROXY_FRONT), "-j", "REDIRECT", "--to-ports", str(HAPROXY_PORT)],
            "securityContext": {"runAsUser": 0, "runAsNonRoot": False, "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}}}


def manifests(ns: str, redirect_image: str | None = None) -> list[dict]:
    """The bench's objects; ``redirect_image``: the image of HAProxy's redirect (the agent's)."""
    labels = {"app": "bench-app"}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bench-server"},
         "data": {"server.py": SERVER, "haproxy.cfg": HAPROXY_CFG}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "bench-app", "labels": labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {"terminationGracePeriodSeconds": 2, "initContainers": [redirect_container(redirect_image)],
                      "containers": [{
                 "name": "app", "image": testapp_image(), "imagePullPolicy": "Never",
                 "command": ["python3", "/bench/server.py"],
                 "env": [{"name": "PORT", "value": f"{APP_PORT},{DIRECT_PORT}"},
                         {"name": "BENCH_SIDE", "value": "cluster"}],
                 # Only the intercepted port is declared: the other two are the bench's own paths.
                 "ports": [{"containerPort": APP_PORT}],
                 "readinessProbe": {"tcpSocket": {"port": APP_PORT}, "periodSeconds": 1},
                 "volumeMounts": [{"name": "server", "mountPath": "/bench", "readOnly": True},
                                  {"name": "data", "mountPath": "/data"}]}, {
                 "name": "haproxy", "image": "tpenv/haproxy:dev", "imagePullPolicy": "Never",
                 "args": ["-f", "/bench/haproxy.cfg"],
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                     "allowPrivilegeEscalation": False},
                 "volumeMounts": [{"name": "server", "mountPath": "/bench", "readOnly": True}]}],
                 "volumes": [{"name": "server", "configMap": {"name": "bench-server"}},
                             {"name": "data", "emptyDir": {}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bench-app"},
         "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": APP_PORT}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bench-direct"},
         "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": DIRECT_PORT}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bench-haproxy"},
         "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": HAPROXY_FRONT}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bench-client"},
         "spec": {"terminationGracePeriodSeconds": 0, "activeDeadlineSeconds": 3600, "containers": [{
             "name": "c", "image": testapp_image(), "imagePullPolicy": "Never",
             "command": ["sleep", "3600"]}]}},
    ]


def short_err(text: str) -> str:
    """kubectl's stderr without the long URLs it quotes, last 300 characters."""
    return re.sub(r'"?https?://[^"\s]*"?', "<url>", " ".join(text.split()))[-300:]


def local_cluster() -> bool:
    import cli as cluster_cli  # tests/cluster/cli.py (on sys.path through tests/kit/kubectl.py's import)

    return os.path.realpath(os.environ.get("KUBECONFIG", "")) == os.path.realpath(cluster_cli.kubeconfig_path())


def agent_image() -> str | None:
    """$TPENV_AGENT_IMAGE, else on the local cluster the image of this checkout's agent code, built and
    imported now when missing (cached layers: about a second); None: tpenv's default."""
    if os.environ.get("TPENV_AGENT_IMAGE"):
        return os.environ["TPENV_AGENT_IMAGE"]
    if not local_cluster():
        return None
    from tests.cluster.images import agent_image_ref

    cp = subprocess.run([sys.executable, str(REPO / "tests" / "cluster" / "cli.py"), "images"], capture_output=True,
                        text=True, timeout=900)
    if cp.returncode != 0:
        log(f"building the images failed (exit {cp.returncode}): {cp.stderr.strip()[-300:]}")
    return agent_image_ref()


# The agent image of this run: set once by Bench.setup (bench/session.py), read by every tpenv started.
AGENT_IMAGE: str | None = None


def tpenv_env(state: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TPENV_AGENT_IMAGE_PULL_POLICY", "Never")
    if AGENT_IMAGE:
        env["TPENV_AGENT_IMAGE"] = AGENT_IMAGE
    env.update(TPENV_SESSION_STATE_DIR=str(state), TPENV_KUBE_ROLLOUT_TIMEOUT="120",
               # bench-app's agent serves the passthrough phases with no tpenv running, and the
               # raw step restarts its pod: its redirect must come back with the pod, which only
               # the init container's does (an ephemeral one is added by a running tpenv). The
               # hop measured is the same rule either way; the `up` phase measures the default.
               TPENV_AGENT_REDIRECT_VIA="init-container")
    return env

