"""Issue 12, Done-when 2: the agent in a namespace enforcing Pod Security `restricted`.

The namespace is labelled `pod-security.kubernetes.io/enforce: restricted` (the local API
server runs the PodSecurity admission plugin, on by default), so a pod whose agent asked for
root, a capability or a writable root filesystem would never be created. The app is itself a
restricted-compliant Deployment running as uid 1000 with an fsGroup and an emptyDir it writes.
An intercept works (Service traffic reaches the laptop), the agent runs as the app's user with
a read-only root filesystem, and it reads the app's volume.
"""
from __future__ import annotations

import json
import os

import pytest

from test_intercept_kit import Intercepting, LocalServer, wait_for
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json
from tests.kit.apps import testapp_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

RESTRICTED_SC = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                 "seccompProfile": {"type": "RuntimeDefault"}}

GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
# Run in the agent container: who it is, whether its root filesystem takes a write, and the CPU
# policy of every thread of the sidecar (SCHED_BATCH, main.cpu_policy: no capability needed).
PROBE = ("import json, os\n"
         "try:\n    open('/probe', 'w'); ro = False\nexcept OSError as e:\n    ro = e.errno == 30\n"
         "pid = next(p for p in os.listdir('/proc') if p.isdigit()\n"
         "           and b'sidecar' in open(f'/proc/{p}/cmdline', 'rb').read().split(b'\\0'))\n"
         "policies = sorted({os.sched_getscheduler(int(t)) for t in os.listdir(f'/proc/{pid}/task')})\n"
         "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(), 'ro': ro,\n"
         "                  'policies': policies, 'data': open('/tpenv/mounts/data/app.txt').read()}))")


def restricted_app(ns: str) -> None:
    kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest", "--overwrite")
    apply([
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                  "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                      "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000,
                                          "seccompProfile": {"type": "RuntimeDefault"}},
                      "containers": [{
                          "name": "app", "image": testapp_image(), "imagePullPolicy": "Never",
                          "command": ["sh", "-c", "umask 027; echo app data > /data/app.txt; exec tpenv-echo"],
                          "ports": [{"containerPort": 8080, "name": "http"}],
                          "securityContext": RESTRICTED_SC,
                          "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                          "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}],
                      "volumes": [{"name": "data", "emptyDir": {}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"selector": {"app": "web"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}},
    ], ns=ns)
    kubectl("rollout", "status", "deployment/web", "--timeout=120s", ns=ns, timeout=150)


def test_intercept_in_a_restricted_namespace(namespace, tmp_path):
    ns = namespace
    # Stage 1: the namespace really enforces `restricted`: a root pod is refused at creation.
    restricted_app(ns)
    root_pod = kubectl("run", "root-pod", f"--image={testapp_image()}", "--image-pull-policy=Never",
                       "--restart=Never", "--command", "--", "sleep", "60", ns=ns, check=False)
    assert root_pod.returncode != 0 and "violates PodSecurity" in root_pod.stderr, root_pod.stderr

    # Stage 2: intercept the Service's port; its traffic reaches the laptop.
    laptop = LocalServer("served by the laptop in a restricted namespace")
    run = Intercepting(tmp_path, "web", "--port", f"{laptop.port}:web", "-n", ns, "--mount", "false")
    try:
        info = run.ready()
        pod = info["pods"][0]
        got = wait_for("the Service's traffic on the laptop", lambda: "restricted namespace" in kubectl(
            "exec", pod, "-c", "app", "--", "python3", "-c", GET, f"http://web.{ns}", ns=ns).stdout, 60)
        assert got

        # Stage 3: the agent as admitted: the restricted profile, resources set.
        spec = next(c for c in kubectl_json("get", "pod", pod, ns=ns)["spec"]["containers"]
                    if c["name"] == "tpenv-agent")
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["resources"]["requests"] and spec["resources"]["limits"]["memory"]

        # Stage 4: and as it runs: the app's uid, the pod's fsGroup, a root fs that refuses writes,
        # the app's volume readable (a file the app made group-readable only).
        probe = json.loads(kubectl("exec", pod, "-c", "tpenv-agent", "--", "python3", "-c", PROBE, ns=ns).stdout)
        assert probe["uid"] == 1000 and 2000 in probe["groups"], probe
        assert probe["ro"] is True and probe["data"] == "app data\n", probe
        assert probe["policies"] == [os.SCHED_BATCH], probe
    finally:
        run.stop()
        laptop.close()
