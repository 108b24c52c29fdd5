"""tpenv doctor against the real local cluster: healthy, then broken for real one way at a time.

Stages (one namespace, one hello Deployment):
1. healthy: exit 0, every check listed with its time;
2. sshfs absent (a PATH without it: other tests need the real sshfs): named, with its fix;
3. the agent image missing (an image no node has, pull policy Never): named;
4. a Role without pods/portforward (a ServiceAccount's token as the kubeconfig): named, with the
   kubectl lines that grant it to that ServiceAccount; its missing pods/exec is a warning naming
   the feature it takes away (the app's own env);
5. an agent kept after a clean leave: reported, exit 0 (by design); an agent abandoned by a
   kill -9 of `tpenv intercept`: named; `--fix` removes it; doctor exits 0;
6. a Service left on `tpenv-8080` (what a GitOps revert of the workload leaves): named; `--fix`
   puts the number back; doctor exits 0 and the Service answers again.

Doctor sees the manager and its webhook too (cluster-wide), so run this under the lock:
flock /tmp/tpenv-clusterwide.lock .venv/bin/python -m pytest tests/e2e/test_doctor.py
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from test_intercept_kit import Intercepting, LocalServer, client_pod, curl, deploy_hello, tpenv, wait_for
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

EVERY_CHECK = ["machine/python", "machine/sshfs", "machine/firewall", "machine/userns", "machine/tun",
               "machine/sessions", "machine/mounts", "machine/connect-rules", "cluster/api", "cluster/rights",
               "cluster/cidrs", "cluster/agent-image", "cluster/manager", "cluster/webhook", "cluster/idle-agents",
               "cluster/service-ports", "e2e/tunnel", "e2e/dns"]


def doctor(state: Path, ns: str, *args: str, env: dict | None = None) -> tuple[int, dict]:
    cp = tpenv(state, "-o", "json", "doctor", "-n", ns, *args, check=False, env=env, timeout=300)
    try:
        report = json.loads(cp.stdout)
    except ValueError:
        pytest.fail(f"doctor printed no report (exit {cp.returncode}):\n{cp.stdout}\n{cp.stderr}", pytrace=False)
    return cp.returncode, report


def check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)


def failures(report: dict) -> list[str]:
    return [c["name"] for c in report["checks"] if c["status"] == "fail"]


def path_without(tool: str, where: Path) -> str:
    """A PATH with every program of the real one but ``tool`` (symlinks in ``where``)."""
    where.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for entry in os.scandir(d):
            link = where / entry.name
            if entry.name != tool and not link.exists() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    assert shutil.which(tool, path=str(where)) is None
    return str(where)


def service_account_kubeconfig(ns: str, name: str, out: Path) -> Path:
    """A kubeconfig that authenticates as ServiceAccount ``ns/name`` (a real token, the cluster's CA)."""
    token = kubectl("create", "token", name, "--duration=1h", ns=ns).stdout.strip()
    admin = kubectl_json("config", "view", "--raw", "--minify")
    cluster = admin["clusters"][0]
    out.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": cluster["cluster"]}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa", "namespace": ns}}]}))
    return out


def test_doctor_healthy_then_broken_one_way_at_a_time(namespace, tmp_path):
    ns = namespace
    state = tmp_path / "state"
    state.mkdir()
    deploy_hello(ns)
    client_pod(ns)

    # Stage 1: healthy: exit 0, every check listed and timed.
    code, report = doctor(state, ns)
    assert [c["name"] for c in report["checks"]] == EVERY_CHECK
    assert code == 0, failures(report)
    assert all(c["seconds"] >= 0 for c in report["checks"]) and report["seconds"] > 0
    # No agent yet: the round trip goes through a port-forward to hello's port (bytes back, timed).
    tunnel = check(report, "e2e/tunnel")
    assert tunnel["status"] == "ok" and "round trip through a port-forward to pod hello-" in tunnel["detail"], tunnel
    assert "port 8080 (HEAD / sent, first byte back): " in tunnel["detail"]
    text = tpenv(state, "doctor", "-n", ns).stdout
    assert all(name in text for name in EVERY_CHECK) and " checks in " in text
    print(text)

    # Stage 2: sshfs absent.
    code, report = doctor(state, ns, env={"PATH": path_without("sshfs", tmp_path / "bin")})
    assert code == 1 and failures(report) == ["machine/sshfs"]
    sshfs = check(report, "machine/sshfs")
    assert "sshfs is not installed" in sshfs["detail"]
    assert "apt-get install sshfs" in sshfs["fix"] and "--mount-mode sync" in sshfs["fix"]

    # Stage 3: the agent image missing on every node.
    code, report = doctor(state, ns, env={"TPENV_AGENT_IMAGE": "tpenv/agent:doctor-nowhere"})
    assert code == 1 and "cluster/agent-image" in failures(report)
    image = check(report, "cluster/agent-image")
    assert "tpenv/agent:doctor-nowhere" in image["detail"] and "--agent-image" in image["fix"]

    # Stage 4: a ServiceAccount whose Role has every right intercept needs but pods/portforward,
    # and no pods/exec either (a feature's right: a warning inside the failure, naming the feature).
    kubectl("create", "serviceaccount", "dev", ns=ns)
    apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "dev"}, "rules": [
        {"apiGroups": [""], "resources": ["pods", "services", "secrets"],
         "verbs": ["get", "list", "watch", "create", "update", "patch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets", "replicasets"],
         "verbs": ["get", "list", "watch", "update", "patch"]}]}, ns=ns)
    kubectl("create", "rolebinding", "dev", "--role=dev", f"--serviceaccount={ns}:dev", ns=ns)
    kubeconfig = service_account_kubeconfig(ns, "dev", tmp_path / "sa.kubeconfig")
    code, report = doctor(state, ns, env={"KUBECONFIG": str(kubeconfig)})
    assert code == 1 and "cluster/rights" in failures(report)
    rights = check(report, "cluster/rights")
    needed = rights["detail"].partition("; warning: ")[0]
    # The only needed right missing is pods/portforward: exactly one "(why)" in the needed part.
    assert needed == (f"system:serviceaccount:{ns}:dev may not, in namespace {ns!r}: create pods/portforward "
                      "(reach the agent (its SSH listens on the pod's loopback))"), rights["detail"]
    assert "without create pods/exec, the app's own environment is unavailable: variables the app's image" \
        in rights["detail"]
    assert "--resource=pods/portforward,pods/exec" in rights["fix"] and f"--serviceaccount={ns}:dev" in rights["fix"]
    assert "get pods" not in rights["detail"]  # only what is missing

    # Stage 5a: an intercept left cleanly (Ctrl-C) keeps its agent in passthrough, by design:
    # reported, not a failure, and --fix leaves it alone.
    local = LocalServer("from the laptop")
    run = Intercepting(state, "hello", "--port", str(local.port), "--mount", "false", "-n", ns)
    try:
        run.ready()
        assert run.stop() == 0
    finally:
        local.close()
    code, report = doctor(state, ns)
    assert code == 0, failures(report)
    idle = check(report, "cluster/idle-agents")
    assert idle["status"] == "ok" and "kept in passthrough after a leave" in idle["detail"], idle
    assert "deployment/hello" in idle["detail"]
    # With an agent there, the tunnel probe is what an intercept does first: SSH to it, one request.
    tunnel = check(report, "e2e/tunnel")
    assert tunnel["status"] == "ok", tunnel
    assert tunnel["detail"].startswith("SSH round trip to the agent of deployment/hello (pod hello-"), tunnel

    # Stage 5b: kill -9 of `tpenv intercept` leaves an agent no session uses.
    local = LocalServer("from the laptop")
    run = Intercepting(state, "hello", "--port", str(local.port), "--mount", "false", "-n", ns)
    try:
        run.ready()
        run.kill(signal.SIGKILL)
        # The agent's lease ends the dead session's intercept; the agent says so itself. (`list`
        # gets a state dir of its own: it would tidy the killed session's files doctor must see.)
        lister = tmp_path / "lister"
        lister.mkdir()
        wait_for("the agent to drop the killed session's intercept",
                 lambda: not json.loads(tpenv(lister, "-o", "json", "list", "-n", ns).stdout)[0]["intercepts"],
                 timeout=60)
    finally:
        run.stop()
        local.close()
    code, report = doctor(state, ns)
    assert code == 1 and failures(report) == ["cluster/idle-agents"]
    idle = check(report, "cluster/idle-agents")
    assert "deployment/hello" in idle["detail"] and idle["fix"] == f"tpenv uninstall --agent deployment/hello -n {ns}"
    assert check(report, "machine/sessions")["status"] == "warn"  # the killed process's files
    code, report = doctor(state, ns, "--fix")
    assert code == 0, report
    assert any("removed the agent from" in c and "deployment/hello" in c for c in report["changed"])
    assert not any(c["name"] == "tpenv-agent" for c in kubectl_json("get", "deployment", "hello", ns=ns)
                   ["spec"]["template"]["spec"]["containers"])
    code, report = doctor(state, ns)
    assert code == 0, failures(report)
    assert check(report, "machine/sessions")["status"] == "ok"

    # Stage 6: a Service left on tpenv-8080 (its workload reverted by GitOps): every request fails.
    kubectl("patch", "service", "hello", "--type=json",
            "-p", '[{"op":"replace","path":"/spec/ports/0/targetPort","value":"tpenv-8080"}]', ns=ns)
    code, report = doctor(state, ns)
    assert code == 1 and failures(report) == ["cluster/service-ports"]
    ports = check(report, "cluster/service-ports")
    assert "service/hello targets port tpenv-8080" in ports["detail"]
    assert ports["fix"].startswith(f"kubectl -n {ns} patch service hello") and ports["fixable"]
    code, report = doctor(state, ns, "--fix")
    assert code == 0 and any("service/hello" in c for c in report["changed"])
    assert kubectl_json("get", "service", "hello", ns=ns)["spec"]["ports"][0]["targetPort"] == 8080
    code, report = doctor(state, ns)
    assert code == 0, failures(report)
    wait_for("hello to answer through its Service again", lambda: "source" in curl(ns, f"http://hello.{ns}/"))
