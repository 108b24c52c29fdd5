"""A new user's first `tpenv init` + `tpenv up` (issue #19), the real CLI against the real cluster.

Each test starts from `tpenv init` output for a Deployment like the issue's (two replicas, an
`emptyDir` volume, a named container port), with the README's `run` block added and the default
mount (`./cart.vol`, inside the watched directory):

1. the laptop answers in-cluster requests within the `up` benchmark's bound; a saved `*.py`
   restarts the handler (SIGTERM: no KeyboardInterrupt traceback); a file the pod writes into
   the mounted volume does not (in sync mode, where it lands as a local file a `**/*.py` glob
   matches, only the exclusion of tpenv's outputs keeps it from restarting the handler);
2. a stuck mount (sshfs SIGSTOPped) fails the mount unit with its reason while the intercept
   keeps serving, and one Ctrl-C ends `tpenv up` within `shutdown_grace`, nothing left behind,
   also when the mount is still stuck at the Ctrl-C; a second Ctrl-C exits within
   FORCE_EXIT_AFTER, the stuck mount detached and its sshfs and the handler killed;
3. `tpenv up` killed with -9: nothing survives it, or the next `tpenv up` clears it and says so.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from bench.up_latency import WAIT as UP_BENCH_WAIT  # the bound of each of the bench's waits (--timeout)
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json
from tests.e2e.helpers_up import free_port
from tests.e2e.test_intercept_kit import tpenv
from tests.e2e.test_up_kit import HANDLER, UpSession, answered_by_laptop, client, pid_alive, set_version, wait_client
from tests.kit.apps import testapp_image
from tpenv.engine.up import FORCE_EXIT_AFTER, shutdown_grace
from tpenv.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

README_RUN = {"command": ["python3", "server.py"], "watch": ["*.py"]}  # README.md's run block
# A process's own exit after its last step (interpreter teardown) on a loaded 2-core machine:
# added to the bounds of a stop, which are the code's (shutdown_grace, FORCE_EXIT_AFTER).
EXIT_SLACK = 5.0


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


def first_run(ns: str, workdir: Path, mode: str = "auto", watch: list[str] | None = None) -> int:
    """`tpenv init cart`, then what the README says to add: the run block and server.py (and
    ``mount.mode`` when not the default, ``watch`` globs other than the README's). Returns the
    local port."""
    port = free_port()
    cp = tpenv(workdir, "-n", ns, "init", "cart", "--port", str(port))
    # init suggests keeping the env file (secrets) and the volumes out of git.
    assert "add to .gitignore" in cp.stdout and "/cart.env" in cp.stdout and "/cart.vol/" in cp.stdout, cp.stdout
    yaml = YAML()
    path = workdir / "telepresence.yaml"
    doc = yaml.load(path.read_text())
    ic = doc["intercepts"][0]
    assert ic["mount"] == "./cart.vol" and ic["env"]["file"] == "cart.env"  # inside the watched directory
    ic["run"] = dict(README_RUN, **({"watch": watch} if watch else {}))
    if mode != "auto":
        ic["mount"] = {"path": "./cart.vol", "mode": mode}
    with path.open("w") as f:
        yaml.dump(doc, f)
    (workdir / "server.py").write_text(HANDLER.replace('int(os.environ["PORT"])', str(port)))
    return port


def in_proc_mounts(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


def up_until_serving(up: UpSession, ns: str, *, started: float, sshfs: bool = True) -> dict:
    """Wait for the laptop to answer in-cluster, at most the `up` bench's bound from ``started``
    (taken before `tpenv up` started); returns the mount unit's status row."""
    deadline = started + UP_BENCH_WAIT
    up.wait_ready("intercept/", "handler/cart", timeout=max(0.0, deadline - time.monotonic()))
    up.until("the laptop answers http://cart/", answered_by_laptop(ns, "http://cart/"),
             max(0.0, deadline - time.monotonic()))
    print(f"tpenv up -> in-cluster request answered by the laptop: {time.monotonic() - started:.1f}s "
          f"(bound {UP_BENCH_WAIT:.0f}s)")
    mount = up.unit("mount/cart")
    assert mount is not None and mount["state"] == "ready" and (mount.get("pid") or not sshfs), up.units()
    return mount


@pytest.mark.parametrize("mode", ["auto", "sync"])
def test_init_then_up_serves_and_restarts_on_saves_not_on_pod_writes(namespace, tmp_path, mode):
    # auto: the default, an sshfs mount, with the README's `*.py`: the pod's writes make no local
    # inotify event (FUSE reports only this machine's changes) and the watcher never enters the
    # mount. sync: a plain local copy the pod's writes land in as local files, which inotify does
    # report, watched with `**/*.py`, which matches them: only the exclusion of tpenv's outputs
    # (up.tpenv_outputs) keeps them from restarting the handler.
    ns = namespace
    # -- stage 1: the workload, `tpenv init`, the README's run block ------------------------------
    cart(ns)
    first_run(ns, tmp_path, mode, watch=["**/*.py"] if mode == "sync" else None)
    started = time.monotonic()
    with UpSession(tmp_path) as up:
        # -- stage 2: `tpenv up`: handler started (the watcher did not walk into ./cart.vol) ----------
        up_until_serving(up, ns, started=started, sshfs=mode == "auto")
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
        assert up.wait(shutdown_grace(Settings()) + EXIT_SLACK) == 0, up.output
    assert not in_proc_mounts(tmp_path / "cart.vol") and not pid_alive(pid3)


def sshfs_is_stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP): state T in /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


# The mount's liveness probe never runs during a test that sets this: the mount stays stuck (not
# yet abandoned by the probe) until the Ctrl-C.
NO_PROBE = {"TPENV_MOUNTS_PROBE_INTERVAL": "3600"}


def test_a_stuck_mount_fails_its_unit_and_one_ctrl_c_ends_up(namespace, tmp_path):
    ns = namespace
    vol = tmp_path / "cart.vol"
    grace = shutdown_grace(Settings())
    # -- stage 1: init + up, serving ---------------------------------------------------------------
    cart(ns)
    first_run(ns, tmp_path)
    started = time.monotonic()
    with UpSession(tmp_path) as up:
        mount = up_until_serving(up, ns, started=started)
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
            # -- stage 4: one Ctrl-C ends it within its grace period (the code's), nothing left --------
            t0 = time.monotonic()
            up.signal(signal.SIGINT)
            assert up.wait(grace + EXIT_SLACK) == 0, up.output
            print(f"Ctrl-C (mount abandoned) -> tpenv up exited: {time.monotonic() - t0:.1f}s (grace {grace:.0f}s)")
        finally:
            if pid_alive(sshfs):
                os.kill(sshfs, signal.SIGCONT)
    assert not in_proc_mounts(vol)
    assert not pid_alive(handler) and not pid_alive(sshfs)
    # -- stage 5: the same Ctrl-C while the mount is still stuck (the probe has not abandoned it),
    #    with a process waiting in the kernel on it --------------------------------------------------
    started = time.monotonic()
    with UpSession(tmp_path, env=NO_PROBE) as up:
        mount = up_until_serving(up, ns, started=started)
        sshfs, handler = mount["pid"], up.handler_pid("cart")
        os.kill(sshfs, signal.SIGSTOP)
        reader = subprocess.Popen(["ls", str(vol / "data")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert up.unit("mount/cart")["state"] == "ready"  # not abandoned: stuck at the Ctrl-C
            assert sshfs_is_stopped(sshfs) and in_proc_mounts(vol)
            t0 = time.monotonic()
            up.signal(signal.SIGINT)
            assert up.wait(grace + EXIT_SLACK) == 0, up.output
            print(f"Ctrl-C (mount stuck) -> tpenv up exited: {time.monotonic() - t0:.1f}s (grace {grace:.0f}s)")
            # What waited on the mount was released (sshfs killed), not left hanging on a detached mount.
            reader.wait(EXIT_SLACK)
        finally:
            if pid_alive(sshfs):
                os.kill(sshfs, signal.SIGCONT)
            if reader.poll() is None:
                reader.kill()
    assert not in_proc_mounts(vol)
    assert not pid_alive(handler) and not pid_alive(sshfs)


def test_a_second_ctrl_c_exits_at_once_even_with_a_stuck_mount(namespace, tmp_path):
    ns = namespace
    vol = tmp_path / "cart.vol"
    cart(ns)
    first_run(ns, tmp_path)
    # A handler that ignores SIGINT, with a long grace: the first Ctrl-C is still stopping it when
    # the second comes, and the intercept (with its mount) waits behind it (dependents stop first).
    # The probe never runs: the mount is still stuck, not abandoned, at the second Ctrl-C.
    server = tmp_path / "server.py"
    server.write_text("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n" + server.read_text())
    started = time.monotonic()
    with UpSession(tmp_path, env={"TPENV_HANDLERS_STOP_GRACE": "300", **NO_PROBE}) as up:
        mount = up_until_serving(up, ns, started=started)
        sshfs, handler = mount["pid"], up.handler_pid("cart")
        os.kill(sshfs, signal.SIGSTOP)
        try:
            up.signal(signal.SIGINT)
            up.wait_output(r"SIGINT: stopping everything")
            assert sshfs_is_stopped(sshfs) and in_proc_mounts(vol) and pid_alive(handler)  # stuck, still stopping
            t0 = time.monotonic()
            up.signal(signal.SIGINT)
            assert up.wait(FORCE_EXIT_AFTER + EXIT_SLACK) == 130, up.output
            print(f"second Ctrl-C -> tpenv up exited: {time.monotonic() - t0:.1f}s (bound {FORCE_EXIT_AFTER:.0f}s)")
            # Right after the forced exit, nothing left: the mount detached (lazily), sshfs and the
            # handler group killed by the abort (which says so), not by time.
            assert up.lines_matching(r"\[mount/cart\] forced: sshfs killed, .*cart\.vol detached"), up.output
            assert not in_proc_mounts(vol), up.output
            assert not pid_alive(sshfs) and not pid_alive(handler), up.output
        finally:
            if pid_alive(sshfs):
                os.kill(sshfs, signal.SIGCONT)


def test_sigkill_of_up_leaves_nothing_or_the_next_up_clears_it(namespace, tmp_path):
    ns = namespace
    cart(ns)
    first_run(ns, tmp_path)
    vol = tmp_path / "cart.vol"
    # -- stage 1: kill -9 of a healthy session: the handler (parent-death signal) and sshfs (its
    #    channel gone) end by themselves, and sshfs unmounts -------------------------------------
    started = time.monotonic()
    with UpSession(tmp_path) as up:
        mount = up_until_serving(up, ns, started=started)
        sshfs, handler = mount["pid"], up.handler_pid("cart")
        up.signal(signal.SIGKILL)
        up.wait(30)
    up.until("mount and handler gone", lambda: not in_proc_mounts(vol) and not pid_alive(handler)
             and not pid_alive(sshfs), 60)
    # -- stage 2: kill -9 while the mount is stuck: the stopped sshfs keeps the mount -------------
    started = time.monotonic()
    with UpSession(tmp_path) as up:
        mount = up_until_serving(up, ns, started=started)
        sshfs, handler = mount["pid"], up.handler_pid("cart")
        os.kill(sshfs, signal.SIGSTOP)
        up.signal(signal.SIGKILL)
        up.wait(30)
    up.until("handler gone", lambda: not pid_alive(handler), 60)
    assert in_proc_mounts(vol) and pid_alive(sshfs)
    # -- stage 3: the next `tpenv up` clears it, says so, and serves -----------------------------
    started = time.monotonic()
    with UpSession(tmp_path) as up:
        up_until_serving(up, ns, started=started)
        assert up.lines_matching(r"\[mount/cart\] unmounted .*left behind by an earlier session"), up.output
        assert not pid_alive(sshfs)
        handler = up.handler_pid("cart")
        up.signal(signal.SIGINT)
        assert up.wait(shutdown_grace(Settings()) + EXIT_SLACK) == 0, up.output
    assert not in_proc_mounts(vol) and not pid_alive(handler)
