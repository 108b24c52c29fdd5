"""Injection against a real cluster, in both modes.

Stage 0 (patch mode, no manager): inject()'s objects are accepted by the API server, the pod
runs with the agent ready, traffic through the Service reaches the app through the agent, and
restore() brings the workload and Service back exactly as the server had them.

Webhook mode: `tpenv manager install`, a labelled Deployment's pods get the agent at creation,
an unlabelled one does not, `tpenv manager upgrade` keeps the certificate, `tpenv manager
uninstall` leaves nothing. In file order; the install is shared by the module, the uninstall is
the last test: (1) install through the CLI with the locally built agent image, wait until the
webhook answers (a server-side dry-run pod comes back injected); (2) a labelled Deployment's pod
carries the agent container with the protocol's args, its Secret tpenv-auth is created by the
manager, and the pod runs with the agent ready; (3) pods without the label are untouched;
(4) upgrade; (5) uninstall removes every object the install created.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, live_pods, wait_until
from tpenv.engine.injection import auth_secret_manifest, plan_injection, restore_plan
from tpenv.kits.agent_client import make_auth_material

import components  # noqa: E402  tests/cluster, on sys.path through the plugin
import images  # noqa: E402
from tests.kit.apps import testapp_image

pytestmark = pytest.mark.e2e

APP_IMAGE = testapp_image()
INSTALLED = [  # (kubectl resource, namespace or None) of every object the install makes
    ("namespace/tpenv", None), ("clusterrole/tpenv-manager", None), ("clusterrolebinding/tpenv-manager", None),
    ("mutatingwebhookconfiguration/tpenv-agent-injector", None),
    ("serviceaccount/tpenv-manager", "tpenv"), ("deployment/tpenv-manager", "tpenv"),
    ("service/tpenv-manager", "tpenv"), ("secret/tpenv-manager-tls", "tpenv"), ("configmap/tpenv-manager", "tpenv"),
    ("role/tpenv-client-config", "tpenv"), ("rolebinding/tpenv-client-config", "tpenv"),
]


def tpenv(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpenv.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def agent_image(kubeconfig: Path) -> tuple[str, str]:
    """(image ref, pull policy): on the local cluster, this checkout's agent, built and imported."""
    if Path(kubeconfig) == components.kubeconfig_path():
        images.import_all([images.build_agent(log=print)], log=print, address=str(components.containerd_address()))
        return images.agent_image_ref(), "Never"
    return os.environ.get("TPENV_AGENT_IMAGE") or images.agent_image_ref(), "IfNotPresent"


@pytest.fixture(scope="module")
def cli_env(kubeconfig: Path, agent_image: tuple[str, str]) -> dict:
    ref, policy = agent_image
    return {**os.environ, "KUBECONFIG": str(kubeconfig), "TPENV_AGENT_IMAGE": ref,
            "TPENV_AGENT_IMAGE_PULL_POLICY": policy}


def pod(name: str, *, labelled: bool) -> dict:
    labels = {"app": name, **({"tpenv.io/inject-agent": "enabled"} if labelled else {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "echo", "image": APP_IMAGE, "imagePullPolicy": "Never",
                                     "command": ["tpenv-echo"], "env": [{"name": "GREETING", "value": "hi"}],
                                     "ports": [{"name": "http", "containerPort": 8080}]}]}}


def dry_run_containers(ns: str, labelled: bool = True) -> list[str]:
    cp = kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", ns=ns,
                 input=json.dumps(pod("probe", labelled=labelled)))
    return [c["name"] for c in json.loads(cp.stdout)["spec"]["containers"]]


# --- stage 0: patch mode, straight from inject() to the API server and back ---------------------

SERVER_OWNED = ("resourceVersion", "generation", "uid", "creationTimestamp", "managedFields")


def _comparable(obj: dict) -> dict:
    """What restore promises to bring back: everything but the server's bookkeeping."""
    meta = {k: v for k, v in obj["metadata"].items() if k not in SERVER_OWNED}
    meta["annotations"] = {k: v for k, v in (meta.get("annotations") or {}).items()
                           if k != "deployment.kubernetes.io/revision"} or None
    return {"metadata": meta, "spec": obj["spec"]}


def _replace(obj: dict, ns: str) -> None:
    kubectl("replace", "-f", "-", ns=ns, input=json.dumps(obj))


def test_patch_mode_round_trip(namespace, agent_image):
    ref, policy = agent_image
    template = pod("web", labelled=False)
    # `kubectl create`, not apply: apply's last-applied annotation would be rewritten by `replace`.
    objects = [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                         "template": {"metadata": {"labels": template["metadata"]["labels"]}, "spec": template["spec"]}}},
               {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                                                               {"name": "alt", "port": 81, "targetPort": 8080}]}}]
    kubectl("create", "-f", "-", ns=namespace, input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    kubectl("rollout", "status", "deployment/web", "--timeout=120s", ns=namespace, timeout=140)
    original_wl = kubectl_json("get", "deployment", "web", ns=namespace)
    original_svc = kubectl_json("get", "service", "web", ns=namespace)

    # The hand-over (the fallback where Pod Security forbids the in-pod redirect): a named and a
    # numeric targetPort, the agent takes both, the Service's numeric one is rewritten.
    settings = {"agent_image": ref, "image_pull_policy": policy}
    off = (False, "the hand-over under test")
    first = plan_injection(original_wl, original_svc, "http", settings, redirect=off)
    second = plan_injection(first.workload, original_svc, 81, settings, redirect=off)
    assert first.service is None and second.service["spec"]["ports"][1]["targetPort"] == "tpenv-8080"
    apply(auth_secret_manifest(namespace, make_auth_material()), ns=namespace)
    _replace(second.workload, namespace)
    _replace(second.service, namespace)
    kubectl("rollout", "status", "deployment/web", "--timeout=120s", ns=namespace, timeout=140)

    def only_one() -> list[dict] | None:  # the old pod may still be terminating
        pods = live_pods(namespace, "app=web")
        return pods if len(pods) == 1 else None

    pods = wait_until("only the injected pod left", only_one, 60)
    assert [c["name"] for c in pods[0]["spec"]["containers"]] == ["echo", "tpenv-agent"]

    # Both Service ports now resolve to the agent's ports (the data path is the sidecar's tests' job).
    def endpoint_ports():
        slices = kubectl_json("get", "endpointslices", "-l", "kubernetes.io/service-name=web", ns=namespace)["items"]
        ready = [s for s in slices if any((e.get("conditions") or {}).get("ready") for e in s.get("endpoints") or [])]
        return {p["name"]: p["port"] for s in ready for p in s.get("ports") or []}

    wait_until("the Service's endpoints on the agent ports", lambda: endpoint_ports() == {"http": 7900, "alt": 7901}, 60)

    # Planning again from what the server stored (with its defaults) finds nothing to do: no rollout.
    for port in ("http", 81):
        again = plan_injection(kubectl_json("get", "deployment", "web", ns=namespace),
                               kubectl_json("get", "service", "web", ns=namespace), port, settings)
        assert not again.workload_changed and again.service is None

    back = restore_plan(kubectl_json("get", "deployment", "web", ns=namespace),
                        kubectl_json("get", "service", "web", ns=namespace))
    _replace(back.workload, namespace)
    _replace(back.service, namespace)
    restored_wl = kubectl_json("get", "deployment", "web", ns=namespace)
    restored_svc = kubectl_json("get", "service", "web", ns=namespace)
    assert _comparable(restored_wl) == _comparable(original_wl)
    assert _comparable(restored_svc) == _comparable(original_svc)


# --- webhook mode ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manager(cli_env: dict):
    # A leftover install from an interrupted run would make "uninstall leaves nothing" meaningless.
    tpenv("manager", "uninstall", env=cli_env)
    wait_until("namespace tpenv gone before install",
               lambda: kubectl("get", "namespace", "tpenv", check=False).returncode != 0, 120)
    cp = tpenv("manager", "install", env=cli_env)
    assert cp.returncode == 0, cp.stderr
    yield cp
    tpenv("manager", "uninstall", env=cli_env)


def select_namespace(ns: str, cli_env: dict) -> None:
    """Opt the test's namespace in: the webhook injects only in namespaces listed at install/upgrade."""
    cp = tpenv("manager", "upgrade", "--webhook-namespace", ns, env=cli_env)
    assert cp.returncode == 0 and ns in cp.stdout, cp.stderr


# --- stage 1: install, and the webhook answers ----------------------------------------------------

def test_install_brings_the_webhook_up(manager, namespace, cli_env):
    assert "team mode off" in manager.stdout and "injects in no namespace" in manager.stdout
    select_namespace(namespace, cli_env)
    kubectl("rollout", "status", "deployment/tpenv-manager", "--timeout=180s", ns="tpenv", timeout=200)
    # Ready pod is not enough: the API server must reach it through the Service with our caBundle.
    wait_until("the webhook to inject a dry-run pod", lambda: "tpenv-agent" in dry_run_containers(namespace), 90)
    cm = kubectl_json("get", "configmap", "tpenv-manager", ns="tpenv")
    assert cm["data"]["team_mode"] == "false"


def test_manager_rights_are_least_privilege(manager, namespace, cli_env):
    select_namespace(namespace, cli_env)

    def can(*what: str, as_: str = "system:serviceaccount:tpenv:tpenv-manager", ns: str = namespace) -> bool:
        cp = kubectl("auth", "can-i", *what, f"--as={as_}", ns=ns, check=False)
        return cp.stdout.strip() == "yes"

    # Secrets may be created in the selected namespace (and its own), nowhere else.
    assert can("create", "secrets") and can("create", "secrets", ns="tpenv")
    assert not can("create", "secrets", ns="default") and not can("create", "secrets", ns="kube-system")
    assert not can("get", "secrets") and not can("list", "secrets") and not can("delete", "secrets")
    assert not can("get", "pods") and not can("patch", "deployments")
    # Every user may read the client defaults, and nothing else in tpenv through that Role.
    user = "some-developer"
    cp = kubectl("auth", "can-i", "get", "configmap/tpenv-manager", f"--as={user}",
                 "--as-group=system:authenticated", ns="tpenv", check=False)
    assert cp.stdout.strip() == "yes"
    cp = kubectl("auth", "can-i", "get", "secret/tpenv-manager-tls", f"--as={user}",
                 "--as-group=system:authenticated", ns="tpenv", check=False)
    assert cp.stdout.strip() == "no"


# --- stage 2: a labelled Deployment's pods get the agent -------------------------------------------

def test_labelled_deployment_pod_gets_the_agent(manager, namespace, cli_env, agent_image):
    select_namespace(namespace, cli_env)
    wait_until("the webhook", lambda: "tpenv-agent" in dry_run_containers(namespace), 90)
    template = pod("web", labelled=True)
    apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
           "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": template["metadata"]["labels"]}, "spec": template["spec"]}}},
          ns=namespace)
    pods = wait_until("a pod of deployment web",
                      lambda: kubectl_json("get", "pods", "-l", "app=web", ns=namespace)["items"], 60)
    spec = pods[0]["spec"]
    names = [c["name"] for c in spec["containers"]]
    assert names == ["echo", "tpenv-agent"]
    app, agent = spec["containers"]
    # The in-pod redirect: the app keeps its port; tpenv-init (NET_ADMIN only) redirects it.
    assert app["ports"][0]["name"] == "http"
    assert [c["name"] for c in spec["initContainers"]] == ["tpenv-init"]
    assert spec["initContainers"][0]["args"] == ["init", "--redirect", "8080:7900"]
    assert agent["image"] == agent_image[0] and agent["imagePullPolicy"] == agent_image[1]
    assert agent["command"] == ["tpenv-agent"]
    assert agent["args"] == ["sidecar", "--container", "echo", "--listen", "7900:8080:http",
                             "--ssh", "127.0.0.1:7922", "--health", "0.0.0.0:7921", "--auth-dir", "/tpenv/auth",
                             "--mounts", "/tpenv/mounts", "--lease", "5"]
    assert {"name": "GREETING", "value": "hi"} in agent["env"]
    assert pods[0]["metadata"]["labels"]["tpenv.io/agent"] == "injected"
    # The manager's one side effect: the namespace's auth Secret, with protocol §2's keys.
    wait_until("Secret tpenv-auth made by the manager",
               lambda: kubectl("get", "secret", "tpenv-auth", ns=namespace, check=False).returncode == 0, 30)
    secret = kubectl_json("get", "secret", "tpenv-auth", ns=namespace)
    assert set(secret["data"]) == {"ca_key", "ca.pub", "host_key", "host_key.pub"}
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tpenv"
    # With the Secret there, the pod runs: app and agent both ready.
    kubectl("rollout", "status", "deployment/web", "--timeout=120s", ns=namespace, timeout=140)


# --- stage 3: everything else is left alone ----------------------------------------------------------

def test_unlabelled_pods_are_not_injected(manager, namespace, cli_env):
    select_namespace(namespace, cli_env)
    wait_until("the webhook", lambda: "tpenv-agent" in dry_run_containers(namespace), 90)
    assert dry_run_containers(namespace, labelled=False) == ["echo"]


# --- stage 4: upgrade keeps the certificate and takes a new team mode --------------------------------

def test_upgrade_keeps_tls_and_switches_team_mode(manager, namespace, cli_env):
    select_namespace(namespace, cli_env)
    before = kubectl_json("get", "secret", "tpenv-manager-tls", ns="tpenv")["data"]
    cp = tpenv("manager", "upgrade", "--team-mode", env=cli_env)
    assert cp.returncode == 0, cp.stderr
    assert kubectl_json("get", "configmap", "tpenv-manager", ns="tpenv")["data"]["team_mode"] == "true"
    assert kubectl_json("get", "secret", "tpenv-manager-tls", ns="tpenv")["data"] == before
    cp = tpenv("manager", "upgrade", env=cli_env)  # no flag: team mode and the namespaces stay as installed
    assert cp.returncode == 0 and "team mode on" in cp.stdout and namespace in cp.stdout, cp.stderr
    wait_until("the webhook after upgrade", lambda: "tpenv-agent" in dry_run_containers(namespace), 90)


# --- stage 5: uninstall leaves nothing behind --------------------------------------------------------

def test_uninstall_removes_every_object(manager, cli_env):
    cp = tpenv("manager", "uninstall", env=cli_env)
    assert cp.returncode == 0, cp.stderr
    assert "MutatingWebhookConfiguration/tpenv-agent-injector" in cp.stdout

    def gone() -> bool:
        for resource, ns in INSTALLED:
            if kubectl("get", resource, *(["-n", ns] if ns else []), check=False).returncode == 0:
                return False
        return True

    wait_until("every manager object deleted", gone, 180)
    again = tpenv("manager", "uninstall", env=cli_env)
    assert again.returncode == 0 and "not installed" in again.stdout
