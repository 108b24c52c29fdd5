"""A new user's first `tpenv init` + `tpenv up` (issue #19), the real CLI against the real cluster.

Each test starts from `tpenv init` output for a Deployment like the issue's (two replicas, an
`emptyDir` volume, a named container port), with the README's `run` block added and the default
mount (`./cart.vol`, inside the watched directory):

1. the laptop answers in-cluster requests; a saved `*.py` restarts the handler (SIGTERM: no
   KeyboardInterrupt traceback); a file the pod writes into the mounted volume does not;
2. a stuck mount (sshfs SIGSTOPped) fails the mount unit with its reason while the intercept
   keeps serving, and one Ctrl-C ends `tpenv up` in its grace period, nothing left behind (a
   second Ctrl-C exits at once, nothing left behind either);
3. `tpenv up` killed with -9: nothing survives it, or the next `tpenv up` clears it and says so.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json
from tests.e2e.helpers_up import free_port
from tests.e2e.test_intercept_kit import tpenv
from tests.e2e.test_up_kit import HANDLER, UpSession, answered_by_laptop, client, pid_alive, set_version, wait_client
from tpenv.settings import Settings
from tests.kit.apps import testapp_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

UP_BENCH_WAIT = 90.0  # bench/up_latency.py bounds each of its waits by this (--timeout)
README_RUN = {"command": ["python3", "server.py"], "watch": ["*.py"]}  # README.md's run block


def cart(ns: str) -> None:
    """The issue's workload: 2 replicas, an emptyDir at /data, a named container port."""
    labels = {"app": "cart"}
    apply([
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "cart"},
         "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "terminationGracePeriodSeconds": 2,
                      "volumes": [{"name": "data", "emptyDir": {}}],
                      "containers": [{"name": "app", "image": testapp_image(), "imagePullPolicy": "Never",
                                      "env": [{"name": "ECHO_QUIET", "value": "1"}],
                                      "ports": [{"name": "http", "containerPort": 8080}],
                                      "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                                      "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "cart"},
         "spec": {"selector": labels, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}},
    ], ns=ns)
    client(ns)
    kubectl("rollout", "status", "deployment/cart", "--timeout=120s", ns=ns, timeout=150)
    wait_client(ns)


def first_run(ns: str, workdir: Path, mode: str = "auto") -> int:
    """`tpenv init cart`, then what the README says to add: the run block and server.py (and
    ``mount.mode`` when not the default). Returns the local port."""
    port = free_port()
    cp = tpenv(workdir, "-n", ns, "init", "cart", "--port", str(port))
    # init suggests keeping the env file (secrets) and the volumes out of git.
    assert "add to .gitignore" in cp.stdout and "/cart.env" in cp.stdout and "/cart.vol/" in cp.stdout, cp.stdout
    yaml = YAML()
    path = workdir / "telepresence.yaml"
    doc = yaml.load(path.read_text())
    ic = doc["intercepts"][0]
    assert ic["mount"] == "./cart.vol" and ic["env"]["file"] == "cart.env"  # inside the watched directory
    ic["run"] = dict(README_RUN)
    if mode != "auto":
        ic["mount"] = {"path": "./cart.vol", "mode": mode}
    with path.open("w") as f:
        yaml.dump(doc, f)
    (workdir / "server.py").write_text(HANDLER.replace('int(os.environ["PORT"])', str(port)))
    return port


def in_proc_mounts(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


def up_until_serving(up: UpSession, ns: str, *, sshfs: bool = True) -> dict:
    """Wait for the laptop to answer in-cluster; returns the mount unit's status row."""
    started = time.monotonic()
    up.wait_ready("intercept/", "handler/cart", timeout=UP_BENCH_WAIT)
    up.until("the laptop answers http://cart/", answered_by_laptop(ns, "http://cart/"), UP_BENCH_WAIT)
    print(f"tpenv up -> in-cluster request answered by the laptop: {time.monotonic() - started:.1f}s")
    mount = up.unit("mount/cart")
    assert mount is not None and mount["state"] == "ready" and (mount.get("pid") or not sshfs), up.units()
    return mount


@pytest.mark.parametrize("mode", ["auto", "sync"])
def test_init_then_up_serves_and_restarts_on_saves_not_on_pod_writes(namespace, tmp_path, mode):
    # auto: the default, an sshfs mount; sync: a plain local copy the pod's writes land in, which
    # inotify does see: only the exclusion of tpenv's outputs keeps them from restarting the handler.
    ns = namespace
    # -- stage 1: the workload, `tpenv init`, the README's run block ------------------------------
    cart(ns)
    first_run(ns, tmp_path, mode)
    with UpSession(tmp_path) as up:
        # -- stage 2: `tpenv up`: handler started (the watcher did not walk into ./cart.vol) ----------
        up_until_serving(up, ns, sshfs=mode == "auto")
        # The intercept's note is its current state, not the rollout's last progress line.
        assert not (up.unit("intercept/")["detail"] or "").startswith("Waiting for"), up.units()
        pid1 = up.handler_pid("cart")
        # -- stage 3: a saved *.py restarts the handler, with SIGTERM: no KeyboardInterrupt -----------
        set_version(tmp_path / "server.py", "v2")
        up.until("v2 answers", answered_by_laptop(ns, "http://cart/", version="v2"), 60)
        pid2 = up.handler_pid("cart")
        assert pid2 and pid2 != pid1 and not pid_alive(pid1)
        assert not up.lines_matching("KeyboardInterrupt"), up.output
        # -- stage 4: the pod writes a *.py into the mounted volume (both replicas): no restart -------
        pods = [p["metadata"]["name"] for p in kubectl_json("get", "pods", "-l", "app=cart", ns=ns)["items"]]
        for pod in pods:
            kubectl("exec", pod, "-c", "app", "--", "sh", "-c", "echo 'print(1)' > /data/written_by_pod.py", ns=ns)
        up.until("the pod's file visible locally", lambda: (tmp_path / "cart.vol" / "data" / "written_by_pod.py")
                 .exists(), 60)
        # A local save after it: the restart it causes is the only one, and names only that file.
        (tmp_path / "helper.py").write_text("# saved by the developer\n")
        up.until("restart for helper.py", lambda: up.lines_matching(r"changed: helper\.py; restarting"), 60)
        changed = up.lines_matching(r"\[handler/cart\] changed: ")
        assert len(changed) == 2 and not any("cart.vol" in line or "written_by_pod" in line for line in changed), \
            up.output
        up.until("handler running again", lambda: up.handler_pid("cart") not in (None, pid2), 60)
        assert up.unit("handler/cart")["restarts"] == 2
        pid3 = up.handler_pid("cart")
        # -- stage 5: Ctrl-C: nothing left mounted or running -----------------------------------------
        up.signal(signal.SIGINT)
        assert up.wait(120) == 0, up.output
    assert not in_proc_mounts(tmp_path / "cart.vol") and not pid_alive(pid3)


def shutdown_grace(settings: Settings) -> float:
    """The documented bound of a Ctrl-C (docs/reconciler.md, "Stopping"): the handler's staged stop,
    the mount's two unmount steps, and a tunnel's leave and close (3 s + 5 s in tunnels.py)."""
    h, m = settings.handlers, settings.mounts
    return h.stop_grace + h.term_grace + 2 * m.unmount_timeout + 8.0


def test_a_stuck_mount_fails_its_unit_and_one_ctrl_c_ends_up(namespace, tmp_path):
    ns = namespace
    # -- stage 1: init + up, serving ---------------------------------------------------------------
    cart(ns)
    first_run(ns, tmp_path)
    with UpSession(tmp_path) as up:
        mount = up_until_serving(up, ns)
        sshfs, handler = mount["pid"], up.handler_pid("cart")
        # -- stage 2: the mount stops answering: its unit fails with the reason, within seconds -------
        os.kill(sshfs, signal.SIGSTOP)
        try:
            up.until("mount/cart failed", lambda: (up.unit("mount/cart") or {}).get("state") == "failed", 30)
            row = up.unit("mount/cart")
            assert f"sshfs (pid {sshfs}) is stopped" in (row["last_error"] or ""), row
            # -- stage 3: the intercept keeps serving, and status says so -----------------------------
            up.until("still answered by the laptop", answered_by_laptop(ns, "http://cart/"), 60)
            assert up.unit("intercept/")["state"] == "ready" and up.unit("handler/cart")["state"] == "ready"
            # -- stage 4: one Ctrl-C ends it within the grace period, nothing left --------------------
            grace = shutdown_grace(Settings())
            t0 = time.monotonic()
            up.signal(signal.SIGINT)
            assert up.wait(grace + 30) == 0, up.output  # + 30 s: a loaded 2-core machine
            print(f"Ctrl-C -> tpenv up exited: {time.monotonic() - t0:.1f}s (grace {grace:.0f}s)")
        finally:
            if pid_alive(sshfs):
                os.kill(sshfs, signal.SIGCONT)
    assert not in_proc_mounts(tmp_path / "cart.vol")
    assert not pid_alive(handler) and not pid_alive(sshfs)


def test_a_second_ctrl_c_exits_at_once_even_with_a_stuck_mount(namespace, tmp_path):
    ns = namespace
    cart(ns)
    first_run(ns, tmp_path)
    # A handler that ignores SIGINT, with a long grace: the first Ctrl-C is still stopping it when
    # the second comes (a stuck mount alone is stopped too fast: sshfs is killed first).
    server = tmp_path / "server.py"
    server.write_text("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n" + server.read_text())
    with UpSession(tmp_path, env={"TPENV_HANDLERS_STOP_GRACE": "300"}) as up:
        mount = up_until_serving(up, ns)
        sshfs, handler = mount["pid"], up.handler_pid("cart")
        # Stuck, and Ctrl-C twice before the probe notices: the forced exit does not wait on it.
        os.kill(sshfs, signal.SIGSTOP)
        up.signal(signal.SIGINT)
        up.wait_output(r"SIGINT: stopping everything")
        t0 = time.monotonic()
        up.signal(signal.SIGINT)
        assert up.wait(30) == 130, up.output
        print(f"second Ctrl-C -> tpenv up exited: {time.monotonic() - t0:.1f}s")
    # Nothing left: the mount detached (lazily), sshfs and the handler group killed.
    up.until("sshfs and handler gone", lambda: not pid_alive(sshfs) and not pid_alive(handler), 30)
    assert not in_proc_mounts(tmp_path / "cart.vol")


def test_sigkill_of_up_leaves_nothing_or_the_next_up_clears_it(namespace, tmp_path):
    ns = namespace
    cart(ns)
    first_run(ns, tmp_path)
    vol = tmp_path / "cart.vol"
    # -- stage 1: kill -9 of a healthy session: the handler (parent-death signal) and sshfs (its
    #    channel gone) end by themselves, and sshfs unmounts -------------------------------------
    with UpSession(tmp_path) as up:
        mount = up_until_serving(up, ns)
        sshfs, handler = mount["pid"], up.handler_pid("cart")
        up.signal(signal.SIGKILL)
        up.wait(30)
    up.until("mount and handler gone", lambda: not in_proc_mounts(vol) and not pid_alive(handler)
             and not pid_alive(sshfs), 60)
    # -- stage 2: kill -9 while the mount is stuck: the stopped sshfs keeps the mount -------------
    with UpSession(tmp_path) as up:
        mount = up_until_serving(up, ns)
        sshfs, handler = mount["pid"], up.handler_pid("cart")
        os.kill(sshfs, signal.SIGSTOP)
        up.signal(signal.SIGKILL)
        up.wait(30)
    up.until("handler gone", lambda: not pid_alive(handler), 60)
    assert in_proc_mounts(vol) and pid_alive(sshfs)
    # -- stage 3: the next `tpenv up` clears it, says so, and serves -----------------------------
    with UpSession(tmp_path) as up:
        up_until_serving(up, ns)
        assert up.lines_matching(r"\[mount/cart\] unmounted .*left behind by an earlier session"), up.output
        assert not pid_alive(sshfs)
        handler = up.handler_pid("cart")
        up.signal(signal.SIGINT)
        assert up.wait(120) == 0, up.output
    assert not in_proc_mounts(vol) and not pid_alive(handler)
