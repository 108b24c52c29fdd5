"""The ns capture (tpenv/kits/capture_ns.py) run by a non-root user, on real namespaces, without
the cluster: a private network namespace stands for the developer's machine, the user ``nobody``
runs ``connect -- CMD`` in it, and the core is a stand-in (tests/integration/capture_kit.py: the
callback answers which destination it was handed; the resolver answers 10.199.0.7 for any name).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.cluster.pytest_plugin import wait_until
from tests.kit.procs import alive
from tests.integration.capture_kit import DOUBLE_ANSWER, ROOT, as_user, netns, sh, state, static_client

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0, reason="making the test machine and user needs root")]


@pytest.fixture(scope="module")
def shared_dir():
    """A directory the user nobody can use (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="tpenv-ns-test-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def getter(shared_dir):
    binary = static_client(shared_dir)
    out = sh("file", str(binary), check=False).stdout
    assert "statically linked" in out, out
    return binary


@pytest.fixture
def machine():
    """The developer's machine: a namespace with a local, non-cluster address 10.198.0.1 serving
    HTTP (what CMD dials outside the cluster ranges must come from here, as without tpenv)."""
    with netns() as ns:
        sh("ip", "-n", ns, "addr", "add", "10.198.0.1/32", "dev", "lo")
        site = Path(tempfile.mkdtemp(prefix="tpenv-ns-site-"))
        (site / "marker.txt").write_text("dialled from the machine\n")
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-u", "-m", "http.server", "--bind",
                                   "10.198.0.1", "0", "--directory", str(site)], stdout=subprocess.PIPE, text=True)
        try:
            line = server.stdout.readline()  # "Serving HTTP on 10.198.0.1 port N (...)"
            port = int(line.split(" port ")[1].split()[0])
            yield ns, f"10.198.0.1:{port}"
        finally:
            server.kill()
            server.wait()
            shutil.rmtree(site, ignore_errors=True)


def test_a_non_root_command_is_captured_and_the_machine_unchanged(machine, shared_dir, getter):
    ns, local = machine
    work = Path(tempfile.mkdtemp(prefix="run-", dir=shared_dir))
    work.chmod(0o777)
    os.mkfifo(work / "release", 0o666)
    # Stage 1: what CMD does inside its namespaces; it then waits, so that the machine's state can
    # be compared while it runs.
    script = f"""
        id -u > {work}/uid
        curl -sS -m 20 http://hello.shop:8080/by-name > {work}/by-name
        curl -sS -m 20 http://10.199.3.3:81/by-ip > {work}/by-ip
        {getter} http://hello.shop/static > {work}/static
        curl -sS -m 20 http://{local}/marker.txt > {work}/direct
        getent hosts some.name.example > {work}/getent
        cat /etc/resolv.conf > {work}/resolv
        echo done > {work}/done
        cat {work}/release
    """
    before = state(ns)
    run = subprocess.Popen(["ip", "netns", "exec", ns, *as_user("nobody", "-m", "tests.integration.capture_kit", "ns",
                                                                   "10.199.0.0/16", "--", "sh", "-c", script)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until("CMD done with its requests", lambda: (work / "done").exists() or run.poll() is not None, 120)
        # Stage 2: while CMD runs, the machine's network state is what it was before.
        assert state(ns) == before
        (work / "release").write_text("go\n")
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    # Stage 3: CMD ran as the user, its names and TCP were captured, other addresses dialled as usual.
    assert run.returncode == 0, err
    result = {f: (work / f).read_text() for f in ("uid", "by-name", "by-ip", "static", "direct", "getent", "resolv")}
    assert result["uid"].strip() == "65534"
    assert result["by-name"] == f"captured {DOUBLE_ANSWER}:8080\n"
    assert result["by-ip"] == "captured 10.199.3.3:81\n"
    assert result["static"] == f"captured {DOUBLE_ANSWER}:80\n"  # a static Go binary, its own resolver
    assert result["direct"] == "dialled from the machine\n"
    assert result["getent"].split()[0] == DOUBLE_ANSWER
    assert "nameserver 127.0.0.1" in result["resolv"]
    # Stage 4: nothing root-only was tried (it would have failed loudly for nobody), and after the
    # command the machine is still as it was.
    assert "not permitted" not in err.lower() and "permission denied" not in err.lower(), err
    assert state(ns) == before


def test_disabled_user_namespaces_are_named_with_how_to_enable_them(machine):
    ns, _ = machine
    # A user namespace whose descendants may not make user namespaces (user.max_user_namespaces = 0
    # inside it): the same refusal as on a machine where the sysctl is 0, without changing this one.
    inner = as_user("nobody", "-m", "tests.integration.capture_kit", "ns", "10.199.0.0/16", "--", "true")
    env_py = inner[inner.index("env"):]
    script = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
    r = subprocess.run(["ip", "netns", "exec", ns, "runuser", "-u", "nobody", "--", "unshare", "--user",
                        "--map-root-user", "sh", "-c", script, "sh", *env_py],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "cannot create a user namespace" in r.stderr
    assert "user.max_user_namespaces = 0" in r.stderr
    assert "sudo sysctl -w user.max_user_namespaces=15000" in r.stderr
    assert "Traceback" not in r.stderr


def test_kill_9_of_the_wrapper_takes_the_command_with_it(machine, shared_dir):
    ns, _ = machine
    work = Path(tempfile.mkdtemp(prefix="run-", dir=shared_dir))
    work.chmod(0o777)
    # Stage 1: CMD (a shell that writes its pid, then sleeps) runs in its namespaces, served by the
    # wrapper process (capture_kit's `ns`, as ns_handler and `tpenv connect` run NsCommand).
    run = subprocess.Popen(["ip", "netns", "exec", ns, *as_user("nobody", "-m", "tests.integration.capture_kit", "ns",
                                                                   "10.199.0.0/16", "--", "sh", "-c",
                                                                   f"echo $$ > {work}/pid; exec sleep 600")],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cmd = None
    try:
        wait_until("CMD started", lambda: (work / "pid").exists() and (work / "pid").read_text().strip()
                   or run.poll() is not None, 120)
        assert run.poll() is None, run.communicate()
        cmd = int((work / "pid").read_text())
        # The exec chain keeps one pid from setpriv to sleep: its parent is the wrapper.
        wrapper = int(Path(f"/proc/{cmd}/stat").read_text().rpartition(")")[2].split()[1])
        assert "tests.integration.capture_kit" in Path(f"/proc/{wrapper}/cmdline").read_text()
        assert alive(cmd)
        # Stage 2: kill -9 of the wrapper: the kernel's parent-death signal takes CMD with it.
        os.kill(wrapper, signal.SIGKILL)
        wait_until("CMD gone after kill -9 of its wrapper", lambda: not alive(cmd), 10)
    finally:
        if run.poll() is None:
            run.kill()
        run.wait()
        if cmd is not None and alive(cmd):  # the failure this test is for: do not leave it running
            os.kill(cmd, signal.SIGKILL)
