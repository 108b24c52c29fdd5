"""`tpenv up` heals by itself (issue 6, done-when 5 and the events `up` reacts to), the real CLI
against the real cluster: a workload created after `up` started, a cut connection, a restarted
agent container, the API server away for a while and back, a rollout of a new ReplicaSet."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.cluster.pytest_plugin import kubectl, kubectl_json, wait_until
from tests.e2e.helpers_up import free_port
from tests.e2e.test_intercept_kit import agent_in_pods
from tests.e2e.test_up_kit import (ApiProxy, UpSession, answered_by_laptop, client, deploy, intercept_yaml, ready_pods,
                                   wait_client, write_handler)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def one_intercept(tmp_path, ns: str, name: str = "web") -> tuple[int, str]:
    port = free_port()
    write_handler(tmp_path / name)
    (tmp_path / "telepresence.yaml").write_text(
        f"apiVersion: tpenv/v1\nnamespace: {ns}\nintercepts:\n" + intercept_yaml(name, ns, port, cwd=name))
    return port, f"http://{name}.{ns}/"


def web_and_one_intercept(tmp_path, ns: str) -> str:
    """Stage 1 of most tests here: Deployment web and the client pod ready, a file intercepting web; its URL."""
    deploy("web", ns, wait=False)
    client(ns)
    kubectl("rollout", "status", "deployment/web", "--timeout=120s", ns=ns, timeout=150)
    wait_client(ns)
    return one_intercept(tmp_path, ns)[1]


@contextlib.contextmanager
def up_through_proxy(tmp_path, kubeconfig: str, ns: str, url: str) -> Iterator[tuple[UpSession, ApiProxy]]:
    """`tpenv up` talking to the API server through a proxy the test controls, serving web."""
    proxy = ApiProxy(kubeconfig, tmp_path / "kubeconfig")
    proxy.start()
    try:
        with UpSession(tmp_path, env={"KUBECONFIG": str(proxy.kubeconfig)}) as up:
            laptop_serves(up, ns, url)
            yield up, proxy
    finally:
        proxy.stop()


def laptop_serves(up: UpSession, ns: str, url: str) -> None:
    """`up` has web's intercept and handler ready, and the laptop answers the cluster's requests."""
    up.wait_ready(f"intercept/{ns}/web", "handler/web")
    up.until("web from the laptop", answered_by_laptop(ns, url, name="web"), 60)


def test_workload_created_after_up_is_waited_for(namespace, tmp_path):
    ns = namespace
    # -- stage 1: `tpenv up` for a workload that does not exist yet --------------------------------
    client(ns)
    _, url = one_intercept(tmp_path, ns, "late")
    with UpSession(tmp_path) as up:
        # -- stage 2: it says once what it waits for, and keeps running ---------------------------
        up.wait_output(rf"waiting for deployment/late to exist in namespace {ns}", 60)
        unit = wait_until("the intercept's status", lambda: up.unit(f"intercept/{ns}/late"), 30)
        assert unit["state"] == "pending" and "waiting for deployment/late" in unit["detail"], unit
        assert up.unit("handler/late") is None, "a handler starts with its intercept's env, once it serves"

        # -- stage 3: create it: the watch sees it; the agent is injected and the laptop answers ----
        deploy("late", ns, wait=False)
        wait_client(ns)
        up.wait_ready(f"intercept/{ns}/late", "handler/late", timeout=150)
        a = up.until("late from the laptop", answered_by_laptop(ns, url, name="late"), 60)
        assert a["cluster_env"], "the handler runs with the container's env"
        assert len(up.lines_matching("waiting for deployment/late to exist")) == 1, up.output
        assert up.stop() == 0, up.output


def test_cut_connections_and_agent_restart_heal(namespace, tmp_path, kubeconfig):
    ns = namespace
    # -- stage 1: one intercept, tpenv talking to the API server through a proxy we control ---------
    url = web_and_one_intercept(tmp_path, ns)
    with up_through_proxy(tmp_path, kubeconfig, ns, url) as (up, proxy):
        pid = up.handler_pid("web")

        # -- stage 2: cut every connection (port-forward, SSH, watches): it reconnects by itself --
        lost = len(up.lines_matching(r"session lost"))
        assert proxy.cut() > 0
        up.wait_output(r"session lost", 30, count=lost + 1)
        up.until("web from the laptop after the cut", answered_by_laptop(ns, url, name="web"),
                   60, interval=0.2)

        # -- stage 3: restart the agent container (SIGTERM to its pid 1): heals by itself ----------
        pod = ready_pods(ns, "web")[0]

        def agent_restarts() -> int:
            st = kubectl_json("get", "pod", pod, ns=ns)["status"]["containerStatuses"]
            return next(c["restartCount"] for c in st if c["name"] == "tpenv-agent")

        before = agent_restarts()
        kubectl("exec", pod, "-c", "tpenv-agent", "--", "python3", "-c",
                "import os, signal; os.kill(1, signal.SIGTERM)", ns=ns)
        wait_until("the agent container restarted", lambda: agent_restarts() > before, 60)
        up.until("web from the laptop after the agent restart",
                   answered_by_laptop(ns, url, name="web"), 60, interval=0.2)
        assert up.handler_pid("web") == pid, "the handler is not restarted for a tunnel's sake"
        assert up.unit(f"intercept/{ns}/web")["state"] == "ready"
        assert up.stop() == 0, up.output


def test_api_server_away_for_a_while_and_back(namespace, tmp_path, kubeconfig):
    ns = namespace
    # -- stage 1: one intercept through the API server proxy ---------------------------------------
    url = web_and_one_intercept(tmp_path, ns)
    with up_through_proxy(tmp_path, kubeconfig, ns, url) as (up, proxy):
        pid = up.handler_pid("web")

        # -- stage 2: the API server is unreachable: tpenv retries (with backoff) and says so -------
        proxy.stop()
        up.wait_output(r"cannot reach the API server", 60, count=2)
        assert up.proc.poll() is None

        # -- stage 3: back: the intercept serves again, the handler was left alone -----------------
        proxy.start()
        up.until("web from the laptop after the outage",
                   answered_by_laptop(ns, url, name="web"), 60, interval=0.2)
        assert up.handler_pid("web") == pid

        # -- stage 4: and it still follows the cluster: a deleted pod heals (the pod watch is back) --
        old = ready_pods(ns, "web")
        kubectl("delete", "pod", *old, "--wait=false", ns=ns)
        wait_until("web's replacement pod Ready", lambda: [p for p in ready_pods(ns, "web") if p not in old], 120)
        up.until("web from the laptop via the new pod",
                   answered_by_laptop(ns, url, name="web"), 60, interval=0.2)
        assert up.stop() == 0, up.output


def test_rollout_of_a_new_replicaset_is_followed(namespace, tmp_path):
    ns = namespace
    # -- stage 1: one intercept ---------------------------------------------------------------------
    url = web_and_one_intercept(tmp_path, ns)
    with UpSession(tmp_path) as up:
        laptop_serves(up, ns, url)
        old = ready_pods(ns, "web")

        # -- stage 2: a new ReplicaSet (someone changes the app's env): its pods carry the agent
        #    (the patched template keeps it) and the intercept moves to them by itself --------------
        kubectl("set", "env", "deployment/web", "-c", "app", "FOO=bar", ns=ns)
        kubectl("rollout", "status", "deployment/web", "--timeout=120s", ns=ns, timeout=150)
        wait_until("the old pods gone", lambda: not set(old) & set(ready_pods(ns, "web")), 60)
        new = ready_pods(ns, "web")
        assert set(agent_in_pods(ns, "app=web")) >= set(new), "the new pods carry the agent"
        up.until("web from the laptop via the new ReplicaSet",
                   answered_by_laptop(ns, url, name="web"), 60, interval=0.2)
        assert up.unit(f"intercept/{ns}/web")["state"] == "ready"
        assert up.stop() == 0, up.output


def test_workload_deleted_and_deployed_again(namespace, tmp_path):
    ns = namespace
    # -- stage 1: one intercept ---------------------------------------------------------------------
    url = web_and_one_intercept(tmp_path, ns)
    with UpSession(tmp_path) as up:
        laptop_serves(up, ns, url)

        # -- stage 2: a redeploy: the Deployment deleted, then applied again (without the agent) ----
        kubectl("delete", "deployment", "web", "--wait=false", ns=ns)
        up.wait_output(r"deployment/web was deleted", 60)
        up.wait_output(rf"waiting for deployment/web to exist in namespace {ns}", 60)
        deploy("web", ns, wait=False)

        # -- stage 3: the new Deployment gets the agent, and the laptop answers again by itself ------
        up.until("web from the laptop after the redeploy", answered_by_laptop(ns, url, name="web"), 150)
        assert agent_in_pods(ns, "app=web"), "the agent is injected into the new Deployment"
        up.wait_ready(f"intercept/{ns}/web", "handler/web")
        assert up.stop() == 0, up.output
