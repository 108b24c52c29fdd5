"""The README's main command: `python3 devspace.py demo` (interactive: Ctrl-C ends it cleanly)
and `--once` do the round trip on the cluster (a request from a pod answered by
examples/hello/server.py here), clean up, exit 0."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.cluster.pytest_plugin import wait_until
from tests.kit.apps import testapp_image
from tests.kit.kubectl import kubectl_binary

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def _cluster_answers(kubectl_bin: str) -> bool:
    cp = subprocess.run([kubectl_bin, "-n", "tpenv-demo", "exec", "demo-client", "--", "curl", "-s", "-m", "5",
                         "http://hello.tpenv-demo/"], capture_output=True, text=True, timeout=30)
    try:
        return "pod" in json.loads(cp.stdout)
    except ValueError:
        return False


def _demo_then_ctrl_c(marker: str) -> tuple[int, list[str]]:
    """`devspace.py demo` as a user runs it, in its own session (a terminal's foreground group);
    when a line holding ``marker`` comes out, Ctrl-C: SIGINT to the whole group, as a terminal
    sends it to the demo script and everything it started in that group. Its exit code and lines."""
    proc = subprocess.Popen(["python3", str(ROOT / "devspace.py"), "demo"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    seen = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if marker in line:
                seen.set()
        seen.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert seen.wait(300) and proc.poll() is None, "\n".join(lines)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.5)  # the pump's last lines
    return rc, lines


def _demo_up_processes() -> list[str]:
    """`tpenv up` processes of the demo still running on this machine (the demo's own config)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"up" in argv and any(a.endswith(b"examples/hello/telepresence.yaml") for a in argv):
            found.append(f"{pid}: {b' '.join(argv).decode(errors='replace')}")
    return found


def _cluster_answers_then_delete_namespace() -> None:
    try:
        wait_until("the cluster's hello to answer after Ctrl-C", lambda: _cluster_answers(kubectl_binary()),
                   timeout=60)
    finally:
        subprocess.run([kubectl_binary(), "delete", "namespace", "tpenv-demo", "--wait=true", "--timeout=120s"],
                       capture_output=True, timeout=150)


def test_demo_ctrl_c_in_a_terminal_stops_tpenv_up_cleanly(kubeconfig):
    # tpenv up must get ONE SIGINT (a clean stop); a second one means "force" (hard exit), which
    # the demo once caused by passing the terminal's on.
    # -- stage 1: the demo runs until it says tpenv up keeps running; then Ctrl-C --------------------
    rc, lines = _demo_then_ctrl_c("tpenv up keeps running")
    out = "\n".join(lines)
    assert any("this machine: 'hello from the laptop /from-the-cluster'" in line for line in lines), out

    # -- stage 2: a clean stop, exit 0, nothing left running ----------------------------------------
    assert rc == 0, out
    assert any(line.endswith("[up/telepresence.yaml] stopped") for line in lines), out
    assert "forced: killing handlers now" not in out and "Traceback" not in out, out
    assert not _demo_up_processes(), _demo_up_processes()

    # -- stage 3: the cluster answers again, then the demo's namespace goes --------------------------
    _cluster_answers_then_delete_namespace()


def test_demo_ctrl_c_while_tpenv_up_starts_stops_it_too(kubeconfig):
    # CI once saw a Ctrl-C land while the demo was still printing: a traceback, exit 254, and tpenv
    # up (in its own process group, so the terminal's SIGINT never reached it) kept running with
    # its handler on 127.0.0.1:8080, where every later demo then refused to start. Ctrl-C here
    # comes while tpenv up is still starting: the demo is waiting for it to be ready.
    # -- stage 1: Ctrl-C as soon as tpenv up has a session -------------------------------------------
    rc, lines = _demo_then_ctrl_c("[up/telepresence.yaml] session ")
    out = "\n".join(lines)

    # -- stage 2: no traceback; tpenv up stopped by the demo, not left behind ------------------------
    assert "Traceback" not in out, out
    assert any(line.endswith("[up/telepresence.yaml] stopped") for line in lines), out
    assert not _demo_up_processes(), f"tpenv up outlived the demo: {_demo_up_processes()}\n{out}"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", 8080)) != 0, "the demo's handler still listens on 8080\n" + out
    assert rc == 0, out

    # -- stage 3: the cluster answers as before, then the demo's namespace goes ----------------------
    _cluster_answers_then_delete_namespace()


def _plant_dead_client(kubectl_bin: str) -> None:
    """What a node restart leaves of an earlier demo: its namespace, and a client pod (a bare pod,
    restartPolicy Never) that is never Ready again. Here it is one whose command failed."""
    wait_until("an earlier demo namespace to be gone", lambda: subprocess.run(
        [kubectl_bin, "get", "namespace", "tpenv-demo", "-o", "jsonpath={.status.phase}"],
        capture_output=True, text=True, timeout=30).stdout != "Terminating", timeout=180)
    subprocess.run([kubectl_bin, "create", "namespace", "tpenv-demo"], capture_output=True, timeout=30)
    subprocess.run([kubectl_bin, "-n", "tpenv-demo", "delete", "pod", "demo-client", "--ignore-not-found",
                    "--wait=true"], capture_output=True, check=True, timeout=90)
    subprocess.run([kubectl_bin, "-n", "tpenv-demo", "run", "demo-client", f"--image={testapp_image()}",
                    "--image-pull-policy=Never", "--restart=Never", "--command", "--", "false"],
                   capture_output=True, check=True, timeout=30)
    wait_until("the planted client pod to fail", lambda: subprocess.run(
        [kubectl_bin, "-n", "tpenv-demo", "get", "pod", "demo-client", "-o", "jsonpath={.status.phase}"],
        capture_output=True, text=True, timeout=30).stdout == "Failed", timeout=60)


def test_demo_once_is_answered_by_the_laptop_and_cleans_up(kubeconfig):
    # -- stage 0: an earlier run's dead client pod is in the way (CI once failed on exactly that) ---
    _plant_dead_client(kubectl_binary())

    # -- stage 1: the command exactly as the README gives it (KUBECONFIG is set by the fixture) ---
    cp = subprocess.run(["python3", str(ROOT / "devspace.py"), "demo", "--once"], cwd=ROOT,
                        capture_output=True, text=True, timeout=380)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out

    # -- stage 2: what it reports: the cluster before, this machine during, the cluster after ---
    lines = [line for line in out.splitlines() if line.startswith("demo: ")]
    assert any("replacing the previous run's demo-client pod (Failed" in line for line in lines), lines
    assert any("before tpenv" in line and "the cluster (pod hello-" in line for line in lines), lines
    assert any("with tpenv up" in line and "this machine: 'hello from the laptop /from-the-cluster'" in line
               for line in lines), lines
    assert any("after tpenv up stopped (exit 0): answered by the cluster" in line for line in lines), lines
    assert lines[-1] == "demo: OK: the laptop answered, and the cluster was left as it was"
