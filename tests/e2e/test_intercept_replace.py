"""Issue #11, replace mode (point 6) and its refusals (point 7), against the local cluster.

`tpenv intercept --replace`: while it lasts the app container's process does not run in the pod
(its place is held by `tpenv-agent pause`), every app port reaches the laptop (through the
Service and on the pod IP), and after a leave (Ctrl-C) and after kill -9 of the client the pod
spec and the app's process are back as before; after kill -9 nobody types anything: the agent
applies the restore with its one-workload right (docs/protocol.md §1.4).

Refusals: --mirror with --replace, replace of a workload whose pods run someone else's intercept,
a headless Service on a port the app does not expose. Each names the conflict and the workload's
resourceVersion and generation do not move.
"""
from __future__ import annotations

import signal
import time

import pytest

from test_intercept_kit import Intercepting, LocalServer, client_pod, curl, deploy_hello, tpenv, wait_for
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, live_pods
from tests.kit.apps import testapp_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SECOND_PORT = 28417  # the app's second port; replace sends it to the same number on the laptop

PROCS = ("import os\n"
         "for p in sorted(os.listdir('/proc')):\n"
         "    if p.isdigit():\n"
         "        try: print(open(f'/proc/{p}/cmdline','rb').read().replace(b'\\0',b' ').decode().strip())\n"
         "        except OSError: pass\n")


def deploy_worker(ns: str) -> None:
    """Two ports (http 8080, named, probed by name; 28417 unnamed), both served by tpenv-echo."""
    apply([{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "worker", "labels": {"app": "worker"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "worker"}},
                     "template": {"metadata": {"labels": {"app": "worker"}}, "spec": {
                         "terminationGracePeriodSeconds": 2,
                         "containers": [{
                             "name": "app", "image": testapp_image(), "imagePullPolicy": "Never",
                             "command": ["sh", "-c", f"tpenv-echo --port {SECOND_PORT} & exec tpenv-echo --port 8080"],
                             "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": SECOND_PORT}],
                             "readinessProbe": {"httpGet": {"port": "http", "path": "/"}, "periodSeconds": 2}}]}}}},
           {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "worker"},
            "spec": {"selector": {"app": "worker"},
                     "ports": [{"name": "web", "port": 80, "targetPort": "http"},
                               {"name": "second", "port": SECOND_PORT, "targetPort": SECOND_PORT}]}}], ns=ns)
    kubectl("rollout", "status", "deployment/worker", "--timeout=120s", ns=ns, timeout=150)


def app_processes(ns: str, pod: str) -> list[str]:
    """The command lines of every process in the pod's app container, read inside it."""
    out = kubectl("exec", pod, "-c", "app", "--", "python3", "-c", PROCS, ns=ns).stdout
    return [line for line in out.splitlines() if line]


def settled_template(ns: str) -> dict:
    kubectl("rollout", "status", "deployment/worker", "--timeout=180s", ns=ns, timeout=200)
    return kubectl_json("get", "deployment", "worker", ns=ns)["spec"]


def all_back(ns: str, before_spec: dict) -> bool:
    """The template is the original one and every live pod runs the app's processes again."""
    if kubectl_json("get", "deployment", "worker", ns=ns)["spec"] != before_spec:
        return False
    pods = live_pods(ns, "app=worker")
    if len(pods) != 2 or any(not any(c.get("ready") for c in p["status"].get("containerStatuses") or [])
                             for p in pods):
        return False
    return all(any("tpenv-echo --port 8080" in line for line in app_processes(ns, p["metadata"]["name"]))
               for p in pods)


def check_replaced(ns: str, tmp_path, session_marker: str) -> None:
    """While replaced: no app process in any pod, every port of every path to the laptop."""
    pods = live_pods(ns, "app=worker")
    assert len(pods) == 2
    for p in pods:
        name = p["metadata"]["name"]
        app = next(c for c in p["spec"]["containers"] if c["name"] == "app")
        assert app["args"][0] == "pause" and "readinessProbe" not in app, app
        procs = app_processes(ns, name)
        # The app's processes (sh, two tpenv-echo) are gone; the placeholder holds the container.
        assert not any("tpenv-echo" in line for line in procs), procs
        assert any("tpenv-agent pause" in line for line in procs), procs
        ip = p["status"]["podIP"]
        assert curl(ns, f"http://{ip}:8080/") == "main port on the laptop"
        assert curl(ns, f"http://{ip}:{SECOND_PORT}/") == "second port on the laptop"
    assert curl(ns, f"http://worker.{ns}/") == "main port on the laptop"
    assert curl(ns, f"http://worker.{ns}:{SECOND_PORT}/") == "second port on the laptop"
    listed = tpenv(tmp_path, "list", "-n", ns).stdout
    assert "replace (the app container is stopped in the cluster)" in listed and session_marker in listed, listed


def test_replace_stops_the_app_and_it_comes_back_on_leave_and_after_kill_9(namespace, tmp_path):
    ns = namespace
    deploy_worker(ns)
    client_pod(ns)
    before = settled_template(ns)
    first_pod = live_pods(ns, "app=worker")[0]["metadata"]["name"]
    assert any("tpenv-echo --port 8080" in line for line in app_processes(ns, first_pod))
    main, second = LocalServer("main port on the laptop"), LocalServer("second port on the laptop", SECOND_PORT)
    try:
        # Stage 1: replace, then leave with Ctrl-C.
        run = Intercepting(tmp_path, "worker", "--port", f"{main.port}:web", "--replace", "--mount", "false",
                           "-n", ns)
        try:
            desc = run.ready()
            assert desc["mode"] == "replace", desc
            assert desc["replaced"]["ports"] == {"8080": main.port, str(SECOND_PORT): SECOND_PORT}, desc
            check_replaced(ns, tmp_path, desc["id"])
        finally:
            code = run.stop()
        assert code == 0, "".join(run.stderr)
        # The client restored before exiting: the template as it was, the app's processes running,
        # and the restore right gone (ServiceAccount, Role, RoleBinding, Secret).
        assert kubectl_json("get", "deployment", "worker", ns=ns)["spec"] == before
        wait_for("the app's processes back after leave", lambda: all_back(ns, before), timeout=120)
        leftovers = kubectl("get", "serviceaccounts,roles,rolebindings,secrets", "-o", "name", ns=ns).stdout
        assert "tpenv-restore-worker" not in leftovers, leftovers

        # Stage 2: replace again, then kill -9 the client: the agent restores by itself.
        run = Intercepting(tmp_path, "worker", "--port", f"{main.port}:web", "--replace", "--mount", "false",
                           "-n", ns)
        try:
            desc = run.ready()
            check_replaced(ns, tmp_path, desc["id"])
            run.kill(signal.SIGKILL)
            killed = time.monotonic()
        finally:
            run.kill()
        # Lease (5 s) + the agent's grace (20 s) + the rollout back: nobody types anything.
        wait_for("the workload restored by its agent after kill -9", lambda: all_back(ns, before), timeout=180)
        print(f"app back {time.monotonic() - killed:.1f}s after kill -9")
        # The app's own JSON answer through its Service, once kube-proxy routes to the restored pod
        # (up to its 1 s sync period after the endpoints change; the suite's run once asked sooner).
        wait_for("the Service answered by the restored app", lambda: curl(ns, f"http://worker.{ns}/").startswith("{"),
                 timeout=60)
        # The agent deleted the Secret holding its token (which revokes the token).
        assert kubectl("get", "secret", "tpenv-restore-worker", ns=ns, check=False).returncode != 0
        # What the agent may not delete (its ServiceAccount, Role, RoleBinding) stays, inert (no token
        # exists); `tpenv uninstall --agent` takes it away.
        kinds = [f"{kind}/tpenv-restore-worker" for kind in ("serviceaccount", "role", "rolebinding")]
        assert kubectl("get", *kinds, ns=ns, check=False).returncode == 0
        tpenv(tmp_path, "uninstall", "--agent", "worker", "-n", ns)
        assert "tpenv-restore-worker" not in kubectl("get", "serviceaccounts,roles,rolebindings", "-o", "name",
                                                     ns=ns).stdout
        assert kubectl_json("get", "deployment", "worker", ns=ns)["spec"] == before
    finally:
        main.close()
        second.close()


def _version(ns: str, kind: str, name: str) -> tuple[str, int]:
    meta = kubectl_json("get", kind, name, ns=ns)["metadata"]
    return meta["resourceVersion"], meta["generation"]


def error_lines(cp) -> list[str]:
    return [line for line in cp.stderr.splitlines() if line.startswith(("tpenv: error:", "hint:"))]


def test_replace_refusals_name_the_conflict_and_change_nothing(namespace, tmp_path):
    ns = namespace
    deploy_hello(ns)

    # Stage 1: --mirror with --replace: refused by the flags, before the cluster is even asked.
    unchanged = _version(ns, "deployment", "hello")
    cp = tpenv(tmp_path, "intercept", "hello", "--port", "8080", "--mirror", "--replace", "-n", ns, check=False)
    assert cp.returncode != 0
    assert error_lines(cp)[0].startswith("tpenv: error: --mirror and --replace cannot be combined"), cp.stderr
    assert _version(ns, "deployment", "hello") == unchanged

    # Stage 2: a headless Service on a port the app does not expose.
    apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello-headless"},
           "spec": {"clusterIP": "None", "selector": {"app": "hello"},
                    "ports": [{"name": "metrics", "port": 9187, "targetPort": 9187}]}}, ns=ns)
    cp = tpenv(tmp_path, "intercept", "hello", "--service", "hello-headless", "--port", "8080:metrics",
               "--mount", "false", "-n", ns, check=False)
    assert cp.returncode != 0
    line = error_lines(cp)[0]
    assert "headless Service/hello-headless targets port 9187" in line and "no container" in line, cp.stderr
    assert _version(ns, "deployment", "hello") == unchanged
    assert kubectl("get", "secret", "tpenv-auth", ns=ns, check=False).returncode != 0

    # Stage 3: someone else's personal intercept runs on the pods; a replace would stop the app
    # their unmatched traffic goes to.
    other_state = tmp_path / "other"
    other_state.mkdir()
    theirs = LocalServer("theirs")
    other = Intercepting(other_state, "hello", "--service", "hello", "--port", f"{theirs.port}", "--http-header", "auto",
                         "--mount", "false", "-n", ns)
    try:
        held = other.ready()["id"]
        kubectl("rollout", "status", "deployment/hello", "--timeout=120s", ns=ns, timeout=150)
        unchanged = _version(ns, "deployment", "hello")
        cp = tpenv(tmp_path, "intercept", "hello", "--service", "hello", "--name", "mine", "--port", "8080", "--replace",
                   "--mount", "false", "-n", ns, check=False)
        assert cp.returncode != 0
        line = error_lines(cp)[0]
        assert line.startswith("tpenv: error: cannot replace the app of deployment/hello: its pods run other "
                               "tpenv intercepts") and held in line, cp.stderr
        assert _version(ns, "deployment", "hello") == unchanged
        assert kubectl("get", "serviceaccount", "tpenv-restore-hello", ns=ns, check=False).returncode != 0
    finally:
        other.stop()
        theirs.close()
