"""Issue 17: GitOps injection as Telepresence users write it (cluster-wide: run under
``flock /tmp/tpenv-clusterwide.lock``).

The manifests live in files the test keeps (as in Git) and reach the cluster only through
``kubectl apply``, as a GitOps controller would; tpenv never edits them: the most common shape
there is (a Deployment whose container port has no name, a Service made by ``kubectl expose``
with a numeric targetPort), opted in by Telepresence's annotation, tpenv's label, or both.
(1)/(2) the pods carry the agent, a global and a header intercept work, and afterwards nothing
moved: ``git diff`` of the repo (the files, and a snapshot of the live Deployment and Service
taken right after the rollout: spec, labels, annotations, generation) and ``kubectl diff`` of the
files are both empty; (3) a pod that cannot be injected (UDP only) runs, and the reason is in an
Event on the pod and on the Deployment, in ``tpenv list``, in doctor's cluster/webhook check and
in ``tpenv status``'s warnings; (4) ``manager install`` then at once ``kubectl apply``: the first
pod is injected.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from test_doctor import check, doctor
from test_intercept_kit import Intercepting, client_pod, curl, tpenv, wait_for
from test_intercept_personal import LocalEcho
from test_webhook_injection import agent_image, cli_env  # noqa: F401  (module fixtures)
from test_security_webhook import status_warnings
from test_webhook_injection import tpenv as tpenv_cli
from tests.cluster.pytest_plugin import kubectl, kubectl_json, live_pods, wait_until
from tests.kit.apps import testapp_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

TP_ANNOTATION = "telepresence.getambassador.io/inject-traffic-agent"


@pytest.fixture(scope="module")
def installed(cli_env):  # noqa: F811
    cp = tpenv_cli("manager", "install", env=cli_env)
    assert cp.returncode == 0, cp.stderr
    yield cp
    tpenv_cli("manager", "uninstall", env=cli_env)


@pytest.fixture
def manager(installed, namespace, cli_env):  # noqa: F811
    """The module's install, with this test's namespace selected for injection (upgrade)."""
    cp = tpenv_cli("manager", "upgrade", "--webhook-namespace", namespace, env=cli_env)
    assert cp.returncode == 0, cp.stderr
    assert "the webhook answers" in cp.stdout, cp.stdout
    return cp


def write_manifests(d: Path, ns: str, name: str, *, label: bool, annotation: bool, ports: list[dict]) -> Path:
    """The Deployment as its team keeps it in Git, and the Service `kubectl expose` makes for it."""
    d.mkdir(parents=True, exist_ok=True)
    tpl_meta: dict = {"labels": {"app": name, **({"tpenv.io/inject-agent": "enabled"} if label else {})}}
    if annotation:
        tpl_meta["annotations"] = {TP_ANNOTATION: "enabled"}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
                  "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                           "template": {"metadata": tpl_meta, "spec": {"terminationGracePeriodSeconds": 1,
                                        "containers": [{"name": "echo", "image": testapp_image(),
                                                        "imagePullPolicy": "Never", "command": ["tpenv-echo"],
                                                        "ports": ports}]}}}}
    (d / "deployment.json").write_text(json.dumps(deployment, indent=1))
    if any(p.get("protocol", "TCP") == "TCP" for p in ports):
        cp = kubectl("expose", "-f", str(d / "deployment.json"), "--port", "80", "--target-port", "8080",
                     "--dry-run=client", "-o", "json", ns=ns)
        (d / "service.json").write_text(cp.stdout)
    return d


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("git")
    assert exe, "git is missing: `python3 devspace.py test` installs it (devspace.py TEST_PACKAGES)"
    return subprocess.run([exe, "-C", str(repo), "-c", "user.name=gitops", "-c", "user.email=gitops@localhost",
                           *args], capture_output=True, text=True, timeout=60)


def snapshot(repo: Path, ns: str, name: str) -> None:
    """The live Deployment and Service as far as a GitOps controller or a reviewer would see a
    change (spec, labels, annotations, generation), one file each under live/ in the repo. A
    3-way `kubectl diff` ignores fields neither in the file nor in last-applied: an added
    container, a tpenv.io annotation or label, a renamed Service port would pass it, not this."""
    live = repo / "live"
    live.mkdir(exist_ok=True)
    for kind in ("deployment", "service"):
        obj = kubectl_json("get", kind, name, ns=ns)
        meta = obj["metadata"]
        kept = {"labels": meta.get("labels") or {}, "annotations": meta.get("annotations") or {},
                "generation": meta.get("generation"), "spec": obj["spec"]}
        (live / f"{kind}.json").write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")


def commit_repo(repo: Path, ns: str, name: str) -> None:
    """The team's repo as the cluster has it right after the rollout: the manifests and the snapshot."""
    snapshot(repo, ns, name)
    for args in (("init", "-q"), ("add", "-A"), ("commit", "-q", "-m", "as applied")):
        cp = git(repo, *args)
        assert cp.returncode == 0, f"git {' '.join(args)}: {cp.stdout}{cp.stderr}"


def no_diff(repo: Path, ns: str, name: str) -> None:
    """Nothing moved since commit_repo: the live objects snapshotted again, `git diff --exit-code`
    of the whole repo (the manifests and live/), and `kubectl diff` of the manifests."""
    snapshot(repo, ns, name)
    cp = git(repo, "diff", "--exit-code")
    assert cp.returncode == 0, f"the repo or the live objects changed (git diff):\n{cp.stdout}{cp.stderr}"
    cp = kubectl("diff", "-f", str(repo / "deployment.json"), "-f", str(repo / "service.json"), ns=ns, check=False)
    assert cp.returncode == 0, f"the applied objects differ from the files (kubectl diff):\n{cp.stdout}{cp.stderr}"


def injected_pods(ns: str, app: str) -> list[dict]:
    return [p for p in live_pods(ns, f"app={app}") if any(c["name"] == "tpenv-agent" for c in p["spec"]["containers"])]


@pytest.mark.parametrize("opt_in", ["annotation", "label", "both"])
def test_unnamed_port_and_exposed_service_intercepted_without_changing_git(manager, namespace, tmp_path, opt_in):
    ns = namespace
    files = write_manifests(tmp_path / "git", ns, "hello", label=opt_in in ("label", "both"),
                            annotation=opt_in in ("annotation", "both"), ports=[{"containerPort": 8080}])
    svc = json.loads((files / "service.json").read_text())
    assert svc["spec"]["ports"][0]["targetPort"] == 8080  # what `kubectl expose` makes
    # Stage 1: applied as GitOps would; the pod carries the agent (and the redirect), app port untouched.
    kubectl("apply", "-f", str(files), ns=ns)
    kubectl("rollout", "status", "deployment/hello", "--timeout=180s", ns=ns, timeout=200)
    pods = injected_pods(ns, "hello")
    assert len(pods) == 1, "the webhook did not inject the first pod"
    spec = pods[0]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["tpenv-init"]
    assert spec["containers"][0]["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    commit_repo(files, ns, "hello")  # the repo, and what the cluster holds, before any intercept
    client_pod(ns)
    laptop = LocalEcho("laptop")
    state = tmp_path / "state"
    state.mkdir()
    try:
        # Stage 2: a global intercept, then a header one, through the Service kubectl expose made.
        run = Intercepting(state, "deployment/hello", "--port", f"{laptop.port}:80", "--mount", "false", "-n", ns)
        run.ready()
        wait_for("the laptop through the Service",
                 lambda: json.loads(curl(ns, f"http://hello.{ns}/"))["pod"] == "laptop", 60)
        assert run.stop() == 0, "".join(run.stderr)
        run = Intercepting(state, "deployment/hello", "--port", f"{laptop.port}:80", "--http-header", "x-dev=alice",
                           "--mount", "false", "-n", ns)
        run.ready()
        wait_for("the header intercept",
                 lambda: json.loads(curl(ns, f"http://hello.{ns}/", "x-dev: alice"))["pod"] == "laptop", 60)
        assert json.loads(curl(ns, f"http://hello.{ns}/"))["pod"].startswith("hello-")
        assert run.stop() == 0, "".join(run.stderr)
    finally:
        laptop.close()
    # Stage 3: the cluster still equals the files in Git, and the live objects did not move.
    no_diff(files, ns, "hello")


def test_pod_that_cannot_be_injected_says_why_where_the_user_looks(manager, namespace, tmp_path, cli_env):  # noqa: F811
    ns = namespace
    files = write_manifests(tmp_path / "git", ns, "dns", label=False, annotation=True,
                            ports=[{"containerPort": 5353, "protocol": "UDP"}])
    # Stage 1: kubectl apply; the pod is admitted (runs) without the agent.
    kubectl("apply", "-f", str(files), ns=ns)
    kubectl("rollout", "status", "deployment/dns", "--timeout=180s", ns=ns, timeout=200)
    pods = kubectl_json("get", "pods", "-l", "app=dns", ns=ns)["items"]
    assert pods and not injected_pods(ns, "dns")
    pod = pods[0]
    assert pod["status"]["phase"] == "Running"
    # Stage 2: a Warning Event on the pod and on the Deployment names the reason.
    deploy_uid = kubectl_json("get", "deployment", "dns", ns=ns)["metadata"]["uid"]

    def events_on(uid: str) -> list[str]:
        items = kubectl_json("get", "events", "--field-selector", f"involvedObject.uid={uid}", ns=ns)["items"]
        return [e["message"] for e in items if e["reason"] == "AgentNotInjected" and e["type"] == "Warning"]

    on_pod = wait_until("the Event on the pod", lambda: events_on(pod["metadata"]["uid"]), 90)
    on_deploy = wait_until("the Event on the Deployment", lambda: events_on(deploy_uid), 30)
    for msg in on_pod + on_deploy:
        assert "no TCP port" in msg and "5353/UDP" in msg, msg
    described = kubectl("describe", "deployment", "dns", ns=ns).stdout
    assert "AgentNotInjected" in described
    # Stage 3: `tpenv list` shows it.
    state = tmp_path / "state"
    state.mkdir()
    out = tpenv(state, "list", "-n", ns).stdout
    assert "dns: opted in, not injected:" in out and "no TCP port" in out, out
    # Stage 4: doctor's webhook check names the pod (opted in by the annotation) and the reason,
    # with no delete as its fix (the pod would be refused again); `tpenv status` warns the same.
    _, report = doctor(state, ns, env={"KUBECONFIG": cli_env["KUBECONFIG"]})
    hook = check(report, "cluster/webhook")
    where = f"{ns}/{pod['metadata']['name']} ("
    assert hook["status"] == "warn" and where in hook["detail"], hook
    said = hook["detail"].split(where, 1)[1]
    assert "no TCP port" in said and "5353/UDP" in said, hook
    assert "delete" not in (hook["fix"] or ""), hook
    shown = status_warnings(ns, cli_env)
    assert where in shown["cluster/webhook"]["detail"] and "5353/UDP" in shown["cluster/webhook"]["detail"], shown


def test_apply_right_after_install_gets_the_agent(cli_env, namespace, tmp_path):  # noqa: F811
    ns = namespace
    # Stage 1: no manager, then install; it returns only once the webhook answers.
    tpenv_cli("manager", "uninstall", env=cli_env)
    wait_until("namespace tpenv gone", lambda: kubectl("get", "namespace", "tpenv", check=False).returncode != 0, 180)
    try:
        cp = tpenv_cli("manager", "install", "--webhook-namespace", ns, env=cli_env)
        assert cp.returncode == 0, cp.stderr
        assert "the webhook answers" in cp.stdout, cp.stdout
        # Stage 2: at once, kubectl apply of an opted-in Deployment: its first pod carries the agent.
        files = write_manifests(tmp_path / "git", ns, "first", label=True, annotation=False,
                                ports=[{"containerPort": 8080}])
        kubectl("apply", "-f", str(files), ns=ns)
        first = wait_until("the first pod", lambda: kubectl_json("get", "pods", "-l", "app=first", ns=ns)["items"], 60)
        assert any(c["name"] == "tpenv-agent" for c in first[0]["spec"]["containers"]), first[0]["spec"]
    finally:
        tpenv_cli("manager", "uninstall", env=cli_env)
