"""`tpenv connect`'s host and ns captures end to end, from a separate network namespace acting as
the developer's machine (tests/e2e/laptop_kit.py): it reaches the API server and nothing of the
cluster's pod or service ranges except through tpenv, which every test proves by making the same
requests fail before connect and after quit. The connect process is tests/e2e/capture_connect_kit.py:
the real outbound core (relay session through the manager, tpenv's resolver) with the capture in
front. The manager is installed once for the file (cluster-wide: run under
``flock /tmp/tpenv-clusterwide.lock``).

1. host mode (root): a Service by short name of the connected namespace, `svc.ns`, the FQDN, the
   ClusterIP, a pod IP, a headless pod name, https://kubernetes.default, a mapped namespace's
   short name; `example.com` goes to the laptop's usual nameserver, never to the cluster.
2. kill -9 of the host-mode process: the laptop is at once back to its snapshot (rules, links,
   routes, resolver files byte for byte) and a sweep finds nothing left.
3. ns mode run by the user nobody: the same requests (a static Go binary among the clients), the
   laptop's network state unchanged while it runs and after.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from laptop_kit import Laptop, UpstreamDns
from test_manager_relay import manager_logs, relay_manager  # noqa: F401  (module fixture, reused)
from test_up_kit import echo_app, extra_namespace
from test_webhook_injection import agent_image, cli_env, tpenv  # noqa: F401  (module fixtures, reused)
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, live_pods, wait_until
from tests.integration.capture_kit import as_user, static_client
from tests.kit.apps import testapp_image

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


# --- the cluster side: a Service, a headless StatefulSet, a second (mapped) namespace --------------------

def headless_app(name: str) -> list[dict]:
    labels = {"app": name}
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
         "spec": {"clusterIP": "None", "selector": labels, "ports": [{"name": "http", "port": 8080}]}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name},
         "spec": {"serviceName": name, "replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "terminationGracePeriodSeconds": 2,
                      "containers": [{"name": "app", "image": testapp_image(), "imagePullPolicy": "Never",
                                      "env": [{"name": "ECHO_QUIET", "value": "1"}],
                                      "ports": [{"name": "http", "containerPort": 8080}],
                                      "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}},
    ]


@pytest.fixture
def cluster_apps(relay_manager, namespace):  # noqa: F811
    with extra_namespace("mapped") as mapped:
        apply(echo_app("hello"), ns=namespace)
        apply(headless_app("hl"), ns=namespace)
        apply(echo_app("other"), ns=mapped)
        kubectl("rollout", "status", "deployment/hello", "--timeout=180s", ns=namespace, timeout=200)
        kubectl("rollout", "status", "statefulset/hl", "--timeout=180s", ns=namespace, timeout=200)
        kubectl("rollout", "status", "deployment/other", "--timeout=180s", ns=mapped, timeout=200)
        pod = live_pods(namespace, "app=hello")[0]
        yield {"ns": namespace, "mapped": mapped, "pod_ip": pod["status"]["podIP"],
               "cluster_ip": kubectl_json("get", "service", "hello", ns=namespace)["spec"]["clusterIP"]}


@pytest.fixture
def laptop(kubeconfig):
    work = Path(tempfile.mkdtemp(prefix="tpenv-laptop-"))
    work.chmod(0o755)  # the ns test's user reads the kubeconfig and runs the client from here
    try:
        with Laptop.create(kubeconfig, work) as lap:
            upstream = UpstreamDns(lap.host_ip)
            lap.upstream = upstream
            try:
                yield lap
            finally:
                upstream.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- requests from the laptop -------------------------------------------------------------------------------

def requests_for(apps: dict, names: bool = True) -> dict[str, str]:
    """What the developer tries, and the echo path that proves which request answered. The
    addresses exercise the capture and the relay; the names also the core's resolver."""
    ns = apps["ns"]
    by_address = {"ClusterIP": f"http://{apps['cluster_ip']}/cip", "pod IP": f"http://{apps['pod_ip']}:8080/pod-ip"}
    if not names:
        return by_address
    return {**by_address, "short name": "http://hello/short", "svc.ns": f"http://hello.{ns}/svc-ns",
            "FQDN": f"http://hello.{ns}.svc.cluster.local/fqdn", "headless pod": f"http://hl-0.hl.{ns}:8080/headless",
            "mapped short name": "http://other/mapped"}


def answered(lap: Laptop, url: str) -> bool:
    r = lap.curl(url)
    return r.returncode == 0 and json.loads(r.stdout)["path"] == "/" + url.rsplit("/", 1)[1]


def api_server_status(lap: Laptop, host: str = "kubernetes.default") -> str:
    return lap.curl(f"https://{host}/version", "-k", "-o", "/dev/null", "-w", "%{http_code}").stdout


def nothing_reaches_the_cluster(lap: Laptop, apps: dict) -> None:
    for what, url in requests_for(apps).items():
        assert lap.curl(url).returncode != 0, f"{what} answered without tpenv: the laptop is not isolated"
    assert api_server_status(lap) in ("", "000") and api_server_status(lap, "10.96.0.1") in ("", "000")


def start_host_connect(lap: Laptop, apps: dict) -> subprocess.Popen:
    proc = subprocess.Popen(lap.argv(sys.executable, "-m", "tests.e2e.capture_connect_kit", "host", "--kubeconfig",
                                     str(lap.kubeconfig), "-n", apps["ns"], "--mapped", apps["ns"], "--mapped",
                                     apps["mapped"]), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()  # "ready <cidrs>" once the relay answers and the table is in place
    if not line.startswith("ready"):
        proc.kill()
        pytest.fail(f"connect did not start: {line!r}\n{proc.stderr.read()}", pytrace=False)
    return proc


def show_failure(proc: subprocess.Popen, lap: Laptop, url: str) -> None:
    """What the connect process and the laptop say, printed for the failure report."""
    r = lap.curl(url, "-v")
    print(f"curl {url}: rc={r.returncode}\n{r.stdout}\n{r.stderr}\nnft:\n{lap.snapshot()['nft']}")
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    print("connect's log:\n" + err)


# --- 1. host mode ---------------------------------------------------------------------------------------------

def host_mode_session(apps: dict, lap: Laptop, names: bool) -> None:
    # Stage 1: the laptop reaches the API server, and nothing of the cluster.
    kubectl_bin = shutil.which("kubectl") or str(Path.home() / ".cache/tpenv/bin/k8s-v1.34.4/kubectl")
    assert lap.run(kubectl_bin, "--kubeconfig", str(lap.kubeconfig), "get", "namespace", apps["ns"]).returncode == 0
    nothing_reaches_the_cluster(lap, apps)
    before = lap.snapshot()

    # Stage 2: connected, every form of address answers (the first waits for kube-proxy's rules).
    proc = start_host_connect(lap, apps)
    lap.upstream.asked.clear()  # stage 1's lookups went there: without tpenv, every name does
    reqs = requests_for(apps, names=names)
    try:
        wait_until("the Service answering through tpenv", lambda: answered(lap, reqs["ClusterIP"]), 90)
        failed = {what: lap.curl(url) for what, url in reqs.items() if not answered(lap, url)}
        assert not failed, "\n".join(f"{what}: {r.stdout} {r.stderr}" for what, r in failed.items())
        # The API server's own answer, through its ClusterIP (and by name: the resolver).
        assert api_server_status(lap, "10.96.0.1") in ("401", "403")
        if names:
            assert api_server_status(lap) in ("401", "403")

        # Stage 3: an outside name goes to the laptop's nameserver (port 53 redirected to tpenv's
        # resolver, which forwards it with its marked socket), and no cluster name ever does.
        out = lap.run("getent", "ahostsv4", "example.com").stdout
        assert out.split()[:1] == [UpstreamDns.OUTSIDE_ANSWER], out
        assert "example.com" in lap.upstream.asked
        assert not [n for n in lap.upstream.asked if "hello" in n or apps["ns"] in n], lap.upstream.asked
        assert "example.com" not in manager_logs()
    except BaseException:
        show_failure(proc, lap, reqs["ClusterIP"])
        raise
    finally:
        # Stage 4: quit (Ctrl-C): everything fails again, and the laptop is as it was.
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    nothing_reaches_the_cluster(lap, apps)
    assert lap.snapshot() == before


def test_host_mode_reaches_services_and_pods_and_leaves_outside_names_alone(cluster_apps, laptop):
    host_mode_session(cluster_apps, laptop, names=False)


def test_host_mode_resolves_every_form_of_cluster_name(cluster_apps, laptop):
    # short name, svc.ns, FQDN, headless pod name, a mapped namespace's short name, kubernetes.default
    host_mode_session(cluster_apps, laptop, names=True)


# --- 2. kill -9 in host mode ----------------------------------------------------------------------------------

def test_kill_9_in_host_mode_leaves_the_laptop_as_it_was(cluster_apps, laptop):
    apps, lap = cluster_apps, laptop
    resolv_before = lap.run("cat", "/etc/resolv.conf").stdout.encode()
    before = lap.snapshot()
    proc = start_host_connect(lap, apps)
    url = requests_for(apps)["ClusterIP"]
    try:
        wait_until("the Service answering through tpenv", lambda: answered(lap, url), 90)
    except BaseException:
        show_failure(proc, lap, url)
        raise
    assert lap.snapshot()["nft"] != before["nft"]  # the capture is in place...

    # Stage 2: kill -9 -- no handler runs; the kernel drops the owned table with the process.
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert lap.snapshot() == before  # no rule, link, route or resolver entry left, at once
    assert lap.run("cat", "/etc/resolv.conf").stdout.encode() == resolv_before
    assert lap.curl(url).returncode != 0

    # Stage 3: the sweep of `tpenv quit` / the next connect finds nothing to remove.
    r = lap.run(sys.executable, "-c", "from tpenv.kits.capture_host import sweep; print(sweep())", cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


# --- 3. ns mode, as a user without root ---------------------------------------------------------------------

def _release(fifo):
    """Let the command end: the write waits for its reader in a thread, so a command that died
    before reading the FIFO cannot hang the test (it did once); `_unblock` ends that wait."""
    writer = threading.Thread(target=fifo.write_text, args=("go\n",), name="release-fifo", daemon=True)
    writer.start()
    return writer


def _unblock(fifo, writer) -> None:
    if writer.is_alive():  # nobody read it: open a reader ourselves so the writer's open returns
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(10)
        os.close(fd)


@pytest.mark.parametrize("names", [False, True], ids=["by-address", "by-name"])
def test_ns_mode_as_nobody_reaches_the_cluster_and_changes_nothing(cluster_apps, laptop, names):
    apps, lap = cluster_apps, laptop
    getter = static_client(lap.dir)
    nothing_reaches_the_cluster(lap, apps)
    reqs = requests_for(apps, names=names)
    out = lap.dir / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    os.mkfifo(out / "release", 0o666)
    # Stage 1: the command: the same requests (curl, and a static Go binary with its own resolver),
    # then it waits so the laptop can be compared while it runs.
    lines = ["id -u > $OUT/uid",  # the first request waits for kube-proxy's rules for the new Service
             f"for t in $(seq 60); do curl -sS -m 10 {reqs['ClusterIP']} > /dev/null && break; sleep 1; done"]
    lines += [f"curl -sS -m 15 {url} > $OUT/r{i} 2>&1" for i, url in enumerate(reqs.values())]
    static_url = reqs["svc.ns"].replace("/svc-ns", "/static") if names else reqs["ClusterIP"].replace("/cip", "/static")
    lines += [f"{getter} {static_url} > $OUT/static",
              f"curl -sk -o /dev/null -w '%{{http_code}}' https://{'kubernetes.default' if names else '10.96.0.1'}"
              "/version > $OUT/api",
              "echo done > $OUT/done", "cat $OUT/release"]
    before = lap.snapshot()
    cmd = lap.argv(*as_user("nobody", "-m", "tests.e2e.capture_connect_kit", "ns", "--kubeconfig", str(lap.kubeconfig),
                            "-n", apps["ns"], "--mapped", apps["ns"], "--mapped", apps["mapped"], "--",
                            "env", f"OUT={out}", "sh", "-c", "\n".join(lines)))
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until("the command done with its requests", lambda: (out / "done").exists() or run.poll() is not None,
                   300)
        # Stage 2: while it runs, the laptop's network state is exactly what it was.
        assert lap.snapshot() == before
        writer = _release(out / "release")
        _, err = run.communicate(timeout=60)
        _unblock(out / "release", writer)
    finally:
        if run.poll() is None:
            run.kill()
    # Stage 3: it ran as nobody, every request answered, nothing root-only was tried.
    assert run.returncode == 0, err
    assert (out / "uid").read_text().strip() == "65534"
    for i, (what, url) in enumerate(reqs.items()):
        body = (out / f"r{i}").read_text()
        assert body and json.loads(body)["path"] == "/" + url.rsplit("/", 1)[1], f"{what}: {body!r}\n{err}"
    assert json.loads((out / "static").read_text())["path"] == "/static"
    assert (out / "api").read_text() in ("401", "403")
    assert "not permitted" not in err.lower() and "permission denied" not in err.lower(), err
    # Stage 4: after it, still nothing of the cluster is reachable, and the laptop is unchanged.
    nothing_reaches_the_cluster(lap, apps)
    assert lap.snapshot() == before
