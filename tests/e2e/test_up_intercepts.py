"""`tpenv up` with two intercepts (issue 6, done-when 1, 2, 3 and 6), the real CLI against the real
cluster: both serve in-cluster clients; a deleted pod heals with no command typed; a watched
source edit restarts the handler, an ignored one does not; a config edit changes only the
intercept it touches, an invalid one is reported with file:line and keeps the running state;
`tpenv down` and SIGTERM leave every intercept, stop every handler and keep the agents."""
from __future__ import annotations

import time

import pytest

from tests.cluster.pytest_plugin import kubectl, wait_until
from tests.e2e.helpers_up import free_port
from tests.e2e.test_intercept_kit import agent_in_pods
from tests.e2e.test_up_kit import (UpSession, answered_by_cluster, answered_by_laptop, client, deploy, extra_namespace,
                                   intercept_yaml, pid_alive, ready_pods, set_version, wait_client, write_handler)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def two_intercepts(ports: tuple[int, int], ns_a: str, ns_b: str, *, match_a: str | None = None) -> str:
    """telepresence.yaml: alpha (handler in a/, ignoring scratch_*.py) and beta (handler in b/)."""
    return ("apiVersion: tpenv/v1\n"
            f"namespace: {ns_a}\n"
            "intercepts:\n"
            + intercept_yaml("alpha", ns_a, ports[0], cwd="a", match=match_a, ignore=("scratch_*.py",))
            + intercept_yaml("beta", ns_b, ports[1], cwd="b"))


def setup_two(tmp_path, ns_a: str, ns_b: str) -> None:
    """alpha in ns_a, beta in ns_b, a client pod in ns_a, handlers a/server.py and b/server.py."""
    deploy("alpha", ns_a, wait=False)
    deploy("beta", ns_b, wait=False)
    client(ns_a)
    kubectl("rollout", "status", "deployment/alpha", "--timeout=120s", ns=ns_a, timeout=150)
    kubectl("rollout", "status", "deployment/beta", "--timeout=120s", ns=ns_b, timeout=150)
    wait_client(ns_a)
    write_handler(tmp_path / "a")
    write_handler(tmp_path / "b")


def test_two_intercepts_heal_after_pod_delete_then_down_and_sigterm(namespace, tmp_path):
    ns_a = namespace
    with extra_namespace("up-two-b") as ns_b:
        # -- stage 1: two workloads in two namespaces, a client pod, two local handlers -------------
        setup_two(tmp_path, ns_a, ns_b)
        w = (free_port(), free_port())
        (tmp_path / "telepresence.yaml").write_text(two_intercepts(w, ns_a, ns_b))
        url_a, url_b = f"http://alpha.{ns_a}/", f"http://beta.{ns_b}/"

        with UpSession(tmp_path) as up:
            # -- stage 2: both intercepts serve the in-cluster client from the laptop ----------------
            up.wait_ready(f"intercept/{ns_a}/alpha", f"intercept/{ns_b}/beta", "handler/alpha", "handler/beta")
            up.until("alpha from the laptop", answered_by_laptop(ns_a, url_a, name="alpha"), 60)
            up.until("beta from the laptop", answered_by_laptop(ns_a, url_b, name="beta"), 60)

            # -- stage 3: delete alpha's pod; once its replacement is Ready, the laptop answers again,
            #    with no command typed. The gap is printed, not asserted (timing is the benchmark's).
            old = ready_pods(ns_a, "alpha")
            deleted = time.monotonic()
            kubectl("delete", "pod", *old, "--wait=false", ns=ns_a)
            new = wait_until("alpha's replacement pod Ready",
                             lambda: [p for p in ready_pods(ns_a, "alpha") if p not in old], 120, interval=0.2)
            pod_ready = time.monotonic()
            up.until(f"alpha from the laptop again (new pod {new})",
                       answered_by_laptop(ns_a, url_a, name="alpha"), 60, interval=0.2)
            serving = time.monotonic()
            print(f"\npod delete -> replacement Ready {pod_ready - deleted:.2f}s; "
                  f"Ready -> intercept serving {serving - pod_ready:.2f}s (includes kubectl exec round trips)")
            assert answered_by_laptop(ns_a, url_b, name="beta")(), "beta must not be disturbed"
            assert up.unit("intercept/" + ns_a)["state"] == "ready"

            # -- stage 3b: `tpenv leave alpha` refuses: up keeps the file true; the way out is named -----
            leave = up.tpenv("leave", "alpha")
            assert leave.returncode == 2, leave.stdout + leave.stderr
            assert "belongs to the `tpenv up` session" in leave.stderr and "tpenv down" in leave.stderr
            assert answered_by_laptop(ns_a, url_a, name="alpha")(), "a refused leave must change nothing"

            # -- stage 4: `tpenv down` from another shell: the session ends, nothing points at us ------
            pids = [up.handler_pid("alpha"), up.handler_pid("beta")]
            assert all(pids) and all(pid_alive(p) for p in pids), pids
            down = up.tpenv("down")
            assert down.returncode == 0, down.stdout + down.stderr
            assert up.wait(60) == 0, up.output
        assert not [p for p in pids if pid_alive(p)], f"handlers left running: {pids}"
        wait_until("the cluster answers alpha again", answered_by_cluster(ns_a, url_a), 30)
        wait_until("the cluster answers beta again", answered_by_cluster(ns_a, url_b), 30)
        assert agent_in_pods(ns_a, "app=alpha") and agent_in_pods(ns_b, "app=beta"), "agents stay (passthrough)"

        # -- stage 5: up again (agents already there), then SIGTERM: the same clean end ------------------
        with UpSession(tmp_path) as up:
            up.wait_ready(f"intercept/{ns_a}/alpha", f"intercept/{ns_b}/beta", "handler/alpha", "handler/beta")
            up.until("alpha from the laptop", answered_by_laptop(ns_a, url_a, name="alpha"), 60)
            up.until("beta from the laptop", answered_by_laptop(ns_a, url_b, name="beta"), 60)
            pids = [up.handler_pid("alpha"), up.handler_pid("beta")]
            assert all(pids), pids
            assert up.stop() == 0, up.output  # SIGTERM
        assert not [p for p in pids if pid_alive(p)], f"handlers left running: {pids}"
        wait_until("the cluster answers alpha again", answered_by_cluster(ns_a, url_a), 30)
        wait_until("the cluster answers beta again", answered_by_cluster(ns_a, url_b), 30)
        assert agent_in_pods(ns_a, "app=alpha") and agent_in_pods(ns_b, "app=beta"), "agents stay (passthrough)"
        assert not list((tmp_path / "state").glob("*.sock")), "the session's socket is removed"


def test_edits_restart_only_what_changed(namespace, tmp_path):
    ns_a = namespace
    with extra_namespace("up-edit-b") as ns_b:
        # -- stage 1: the same two intercepts; alpha ignores scratch_*.py -------------------------------
        setup_two(tmp_path, ns_a, ns_b)
        w = (free_port(), free_port())
        config = tmp_path / "telepresence.yaml"
        config.write_text(two_intercepts(w, ns_a, ns_b))
        url_a, url_b = f"http://alpha.{ns_a}/", f"http://beta.{ns_b}/"

        with UpSession(tmp_path) as up:
            up.wait_ready(f"intercept/{ns_a}/alpha", f"intercept/{ns_b}/beta", "handler/alpha", "handler/beta")
            up.until("alpha v1", answered_by_laptop(ns_a, url_a, name="alpha", version="v1"), 60)
            up.until("beta v1", answered_by_laptop(ns_a, url_b, name="beta", version="v1"), 60)
            beta_before = {k: up.unit(k) for k in (f"intercept/{ns_b}/beta", "handler/beta")}
            pid_a, pid_b = up.handler_pid("alpha"), up.handler_pid("beta")

            # -- stage 2: a watched source edit restarts alpha's handler; the next request sees it --------
            set_version(tmp_path / "a" / "server.py", "v2")
            a = up.until("alpha v2 from the cluster",
                           answered_by_laptop(ns_a, url_a, name="alpha", version="v2"), 30, interval=0.2)
            assert a["pid"] != pid_a
            pid_a = wait_until("alpha's new pid in the status", lambda: up.handler_pid("alpha"), 10)
            assert pid_a == a["pid"]
            restarts = up.unit("handler/alpha")["restarts"]

            # -- stage 3: an ignored file changes nothing. Then a watched one: inotify events come in
            #    order, so when the restart for helper.py is logged, a restart for the ignored file
            #    would already have happened (and been logged). Exactly one restart, naming helper.py only.
            (tmp_path / "a" / "scratch_notes.py").write_text("# notes\n")
            assert up.handler_pid("alpha") == pid_a
            (tmp_path / "a" / "helper.py").write_text("# helper\n")
            up.wait_output(r"\[handler/alpha\] changed: .*helper\.py", 30)
            changed = up.lines_matching(r"\[handler/alpha\] changed:")
            assert not [line for line in changed if "scratch_notes" in line], changed
            wait_until("alpha's handler back", lambda: up.handler_pid("alpha") not in (None, pid_a), 30)
            assert up.unit("handler/alpha")["restarts"] == restarts + 1, up.output
            pid_a = up.handler_pid("alpha")

            # -- stage 4: add a header match to alpha in telepresence.yaml: only alpha changes ----------
            config.write_text(two_intercepts(w, ns_a, ns_b, match_a="{headers: {x-dev: alice}}"))
            up.until("alpha intercepted for x-dev: alice only",
                       lambda: answered_by_laptop(ns_a, url_a, "x-dev: alice", name="alpha")()
                       and answered_by_cluster(ns_a, url_a, "x-dev: bob")(), 60, interval=0.2)
            assert answered_by_cluster(ns_a, url_a)(), "without the header: the cluster"
            assert answered_by_laptop(ns_a, url_b, name="beta")()
            up.wait_ready(f"intercept/{ns_a}/alpha", "handler/alpha")
            pid_a = up.handler_pid("alpha")  # alpha's handler follows its intercept (restarted with it)
            beta_after = {k: up.unit(k) for k in beta_before}
            for k in beta_before:  # beta's units were not touched: same state, same since, same pid
                assert {f: beta_after[k][f] for f in ("state", "since", "detail", "restarts")} == \
                       {f: beta_before[k][f] for f in ("state", "since", "detail", "restarts")}, (k, up.output)

            # -- stage 5: an invalid edit: reported with file:line, the running state kept -------------
            bad_line = 1 + two_intercepts(w, ns_a, ns_b).splitlines().index("  - name: alpha") + 1
            bad = two_intercepts(w, ns_a, ns_b, match_a="{headers: {x-dev: alice}}").splitlines(keepends=True)
            bad.insert(bad_line - 1, "    replicas: 3\n")  # no such key in an intercept
            config.write_text("".join(bad))
            up.wait_output(rf"telepresence\.yaml:{bad_line}:\d+: .*replicas", 30)
            wait_until("the status shows the config error",
                       lambda: f"telepresence.yaml:{bad_line}:" in (up.status().get("config_error") or ""), 30)
            units = up.units()
            assert all(u["state"] == "ready" for u in units.values()), units
            assert (up.handler_pid("alpha"), up.handler_pid("beta")) == (pid_a, pid_b)
            assert answered_by_laptop(ns_a, url_a, "x-dev: alice", name="alpha")()
            assert answered_by_laptop(ns_a, url_b, name="beta")()

            # -- stage 6: fixed again: applied, nothing restarted -----------------------------------------
            config.write_text(two_intercepts(w, ns_a, ns_b, match_a="{headers: {x-dev: alice}}"))
            up.wait_output(r"config valid again", 30)
            assert up.handler_pid("alpha") == pid_a
            assert up.stop() == 0, up.output
