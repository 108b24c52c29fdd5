"""`python3 devspace.py cluster up|down|env|status` and `images`: the local single-node cluster.

    up      install missing packages, build binaries (cached), start every daemon that is
            not running (or whose settings changed), wait for node Ready and DNS; idempotent
    down    stop every daemon, remove pods' containers, iptables chains, routes, mounts, CNI state
    env     print `export KUBECONFIG=...`
    status  each component's pid and health; exit 1 when the cluster is not healthy
    images  build the images and import them into the cluster's containerd

Standard library only: this runs before any virtualenv exists. See docs/cluster.md.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build  # noqa: E402
import network as net  # noqa: E402
import packages  # noqa: E402
import storage  # noqa: E402
from components import (COREDNS_RBAC, KUBE_DNS, NODE, Component, Layout, containerd_address,  # noqa: E402
                        kubeconfig_path, state_dir)
from proc import Daemons, mounts_under, run, say, wait_for  # noqa: E402

__all__ = ["main", "kubeconfig_path"]

START_TIMEOUT = {"containerd": 30, "etcd": 60, "kube-apiserver": 120, "kubelet": 90}


def kubectl(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run([build.kubectl_bin(), f"--kubeconfig={kubeconfig_path()}", *args], input=input, check=check,
               quiet=True)


# ---------------------------------------------------------------- up

def _ensure(d: Daemons, c: Component) -> bool:
    """Start ``c`` unless it runs with the same settings. True when it was (re)started."""
    fp_file = d.pids / f"{c.name}.fingerprint"
    fp = c.fingerprint()
    if d.pid(c.name) is not None:
        if not (fp_file.exists() and fp_file.read_text() == fp):
            say(f"{c.name}: settings changed, restarting")
        elif _healthy_within(c, 10):
            return False
        else:
            say(f"{c.name}: running but not healthy for 10s, restarting")
        d.stop(c.name)
    say(f"starting {c.name}")
    d.start(c.name, c.cmd)
    fp_file.write_text(fp)
    return True


def _healthy_within(c: Component, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if c.healthy():
                return True
        except Exception:  # noqa: BLE001 - not healthy
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)


def _wait_healthy(d: Daemons, c: Component) -> None:
    wait_for(c.name, c.healthy, START_TIMEOUT.get(c.name, 60),
             on_fail=lambda: f"last lines of {d.log_path(c.name)}:\n{d.tail(c.name)}",
             alive=lambda: d.pid(c.name) is not None)


def _images(log) -> None:
    """Build the images (cached) and import the missing ones into our containerd."""
    try:
        import images
    except ImportError as e:
        raise RuntimeError(f"tests/cluster/images.py is missing or broken ({e}): no pause image, no pods") from e
    paths = images.build_all(log=log)
    images.import_all(paths, log=log, address=str(containerd_address()))
    _normalize_image_names()


def _pause_image(log) -> None:
    import images
    images.import_all([images.build_pause(log=log)], log=log, address=str(containerd_address()))


def _normalize_image_names() -> None:
    """Tag `tpenv/x:dev` also as `docker.io/tpenv/x:dev`.

    The kubelet asks the CRI for the normalized reference (docker.io/ prefixed, as in
    Docker), and containerd's CRI looks it up by that exact name: an image imported as
    plain `tpenv/x:dev` gives ErrImageNeverPull.
    """
    ctr = ["ctr", "--address", containerd_address(), "-n", "k8s.io", "images"]
    # `ctr images ls` columns: REF TYPE DIGEST ...
    digests = {ln.split()[0]: ln.split()[2] for ln in run([*ctr, "ls"], quiet=True).stdout.splitlines()[1:]
               if len(ln.split()) > 2}
    for name, digest in sorted(digests.items()):
        if name.startswith("sha256:"):
            continue
        first = name.split("/", 1)[0]
        if "/" in name and ("." in first or ":" in first or first == "localhost"):
            continue  # already has a registry host
        full = "docker.io/" + (name if "/" in name else f"library/{name}")
        if digests.get(full) != digest:
            run([*ctr, "tag", "--force", name, full], quiet=True)


def dns_query(name: str, server: str = net.NODE_IP, timeout: float = 2.0) -> tuple[int, int]:
    """One A query over UDP: (rcode, number of answers). Stdlib only, no resolver involved."""
    qid = os.getpid() & 0xFFFF
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    q += struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q, (server, 53))
        resp = s.recv(4096)
    _, flags, _, ancount, _, _ = struct.unpack(">HHHHHH", resp[:12])
    return flags & 0xF, ancount


def _node_ready() -> bool:
    out = kubectl("get", "node", NODE, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                  check=False)
    return out.returncode == 0 and out.stdout.strip() == "True"


def up(argv: list[str]) -> int:
    t0 = time.monotonic()
    if os.geteuid() != 0:
        say("must run as root (it starts containerd, kubelet, and changes routes and iptables)")
        return 1
    if len(str(containerd_address())) > 100:  # sun_path is 108 bytes
        raise RuntimeError(f"{containerd_address()} is too long for a unix socket: use a shorter TPENV_CACHE")
    packages.ensure()
    build.build_all(log=say)
    lay = Layout()
    lay.write_pki()
    net.setup()
    d = Daemons(state_dir())
    comps = {c.name: c for c in lay.components()}

    # containerd first, with the pause image in before any kubelet exists: a sandbox without
    # it would make containerd try to pull it. The other images go in while the control plane starts.
    _ensure(d, comps["containerd"])
    _wait_healthy(d, comps["containerd"])
    _pause_image(log=say)
    errors: list[BaseException] = []

    def image_job() -> None:
        try:
            _images(log=say)
        except BaseException as e:  # noqa: BLE001 - reported after the join
            errors.append(e)

    images_thread = threading.Thread(target=image_job, name="images")
    images_thread.start()

    try:
        for name in ("etcd", "kube-apiserver"):
            _ensure(d, comps[name])
            _wait_healthy(d, comps[name])
        kubectl("apply", "-f", "-", input=json.dumps(COREDNS_RBAC))
        kubectl("apply", "-f", "-", input=json.dumps(KUBE_DNS))  # before kubelet: pods get its ClusterIP
        rest = [c for n, c in comps.items() if n not in ("containerd", "etcd", "kube-apiserver")]
        for c in rest:
            _ensure(d, c)
        for c in rest:
            _wait_healthy(d, c)
        say("waiting for node Ready and cluster DNS")
        wait_for(f"node {NODE} Ready", _node_ready, 120,
                 on_fail=lambda: kubectl("describe", "node", NODE, check=False).stdout[-3000:]
                 + f"\nkubelet log:\n{d.tail('kubelet')}")
        wait_for("CoreDNS answering kubernetes.default.svc.cluster.local",
                 lambda: dns_query("kubernetes.default.svc.cluster.local") == (0, 1), 60,
                 on_fail=lambda: d.tail("coredns"))
    finally:
        images_thread.join()
    if errors:
        raise RuntimeError(f"building or importing the images failed: {errors[0]}") from errors[0]
    # After the images: the provisioner's own image must be in containerd (it is never pulled).
    import images
    storage.install(kubectl, images.local_path_ref(), state_dir() / "local-path", log=say)
    say(f"cluster ready in {time.monotonic() - t0:.1f}s; {env_line()}")
    return 0


# ---------------------------------------------------------------- down

def _unmount_under(root: Path) -> None:
    for m in mounts_under(root):
        run(["umount", "-l", m], check=False, quiet=True)


def down(argv: list[str]) -> int:
    d = Daemons(state_dir())
    # Stop the things that recreate pods and rules first, then remove the pods while
    # containerd still runs, then containerd itself.
    for name in ("kube-proxy", "kubelet", "kube-scheduler", "kube-controller-manager", "coredns"):
        if d.stop(name):
            say(f"stopped {name}")
    if d.pid("containerd") is not None:
        say("removing pod sandboxes and containers")
        _remove_containers()
    for name in ("containerd", "kube-apiserver", "etcd"):
        if d.stop(name):
            say(f"stopped {name}")
    # Volumes (secrets, emptyDirs, subPath binds) and the rootfs mounts a killed containerd leaves.
    _unmount_under(state_dir() / "kubelet")
    _unmount_under(state_dir() / "containerd")
    _remove_pod_cgroups()
    say("removing iptables chains (KUBE-*, CNI-*, TPENV-*), routes and the cni0 bridge")
    net.teardown()
    shutil.rmtree(state_dir() / "cni" / "ipam", ignore_errors=True)
    for p in Path("/var/lib/cni/results").glob("tpenv-*") if Path("/var/lib/cni/results").exists() else []:
        p.unlink(missing_ok=True)
    # Kubelet's pod state refers to sandboxes that no longer exist. Never rmtree through a mount
    # (a subPath bind of a hostPath would take host files with it).
    pods = state_dir() / "kubelet" / "pods"
    held = mounts_under(pods)
    if held:
        say(f"left {pods} in place: still mounted there: {', '.join(held[:3])}")
    else:
        shutil.rmtree(pods, ignore_errors=True)
    say("cluster down (certs, etcd data and images kept for the next `up`)")
    return 0


def _remove_pod_cgroups() -> None:
    """The kubelet's kubepods cgroups, deepest first (rmdir only works on empty ones; busy ones stay)."""
    for top in Path("/sys/fs/cgroup").glob("*/kubepods"):
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: len(w[0]), reverse=True):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


def _remove_containers() -> None:
    addr = str(containerd_address())
    ctr = ["ctr", "--address", addr, "-n", "k8s.io"]
    for task in run([*ctr, "tasks", "ls", "-q"], check=False, quiet=True).stdout.split():
        run([*ctr, "tasks", "kill", "-s", "SIGKILL", task], check=False, quiet=True)
    time.sleep(0.5)
    for task in run([*ctr, "tasks", "ls", "-q"], check=False, quiet=True).stdout.split():
        run([*ctr, "tasks", "delete", "-f", task], check=False, quiet=True)
    containers = run([*ctr, "containers", "ls", "-q"], check=False, quiet=True).stdout.split()
    if containers:
        run([*ctr, "containers", "delete", *containers], check=False, quiet=True)
    # Sandbox network namespaces that the CRI plugin created.
    for ns in Path("/var/run/netns").glob("cni-*") if Path("/var/run/netns").exists() else []:
        run(["umount", ns], check=False, quiet=True)
        try:
            ns.unlink(missing_ok=True)
        except OSError as e:  # still a mount point somewhere: say so, the rest of `down` goes on
            say(f"could not remove {ns}: {e}")


# ---------------------------------------------------------------- status, env

def status(argv: list[str]) -> int:
    d = Daemons(state_dir())
    lay = Layout()
    ok = True
    if not lay.ca.exists():
        say("no cluster here yet: run `python3 devspace.py cluster up`")
        return 1
    for c in lay.components():
        pid = d.pid(c.name)
        try:
            healthy = pid is not None and c.healthy()
        except Exception:  # noqa: BLE001
            healthy = False
        ok &= healthy
        print(f"  {c.name:<24} pid {pid or '-':<8} {'healthy' if healthy else 'DOWN'}")
    problems = net.check()
    for p in problems:
        print(f"  network: {p}")
    ok &= not problems
    node = ok and _node_ready()
    print(f"  node {NODE:<19} {'Ready' if node else 'not Ready'}")
    print(f"  {env_line()}")
    return 0 if ok and node else 1


def env_line() -> str:
    return f"export KUBECONFIG={kubeconfig_path()}"


def env(argv: list[str]) -> int:
    print(env_line())
    return 0


def images_cmd(argv: list[str]) -> int:
    d = Daemons(state_dir())
    if d.pid("containerd") is None:
        say("containerd is not running: `python3 devspace.py cluster up` builds and imports the images")
        return 1
    _images(log=say)
    return 0


@contextlib.contextmanager
def _exclusive():
    """One up/down at a time: several test sessions on this machine may call `up` together."""
    lock = state_dir() / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another `cluster up/down` is running; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


COMMANDS = {"up": up, "down": down, "env": env, "status": status, "images": images_cmd}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 2
    try:
        if argv[0] in ("up", "down", "images"):
            with _exclusive():
                return COMMANDS[argv[0]](argv[1:]) or 0
        return COMMANDS[argv[0]](argv[1:]) or 0
    except (RuntimeError, subprocess.CalledProcessError) as e:
        say(f"FAILED: {e}")
        say(f"logs: {state_dir() / 'logs'}; state: `python3 devspace.py cluster status`")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
