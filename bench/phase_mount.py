"""The SFTP volume mount of a global intercept, read through from the laptop: sequential read and
write of a large file, and a stat of every file of a directory, against files put in the app pod."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.cluster_setup import kjson, kubectl, kubectl_binary
from bench.common import PathLost, Unavailable
from bench.processes import Intercept, PortForward
from bench.session import Bench
from tpenv.kits.mounttable import mount_device
from tpenv.kits.sshfs import raise_read_ahead, sshfs_mount_options
from tpenv.settings import load_settings

# Run on the laptop against the mount point: what an editor or a test run does with remote files.
MOUNT_SCRIPT = r"""
import json, os, sys, time
root, size, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
def sync_read():
    t = time.perf_counter(); n = 0
    with open(os.path.join(root, "big"), "rb", buffering=0) as f:
        while True:
            b = f.read(1 << 20)
            if not b: break
            n += len(b)
    return {"bytes": n, "seconds": time.perf_counter() - t}
out["read"] = sync_read()
if files < 0:  # the peer's mount: the read alone
    print(json.dumps(out)); sys.exit()
block = os.urandom(1 << 20)
t = time.perf_counter()
with open(os.path.join(root, "written"), "wb", buffering=0) as f:
    left = size
    while left > 0:
        left -= f.write(block[:min(left, len(block))])
    os.fsync(f.fileno())
out["write"] = {"bytes": size, "seconds": time.perf_counter() - t}
t = time.perf_counter()
names = os.listdir(os.path.join(root, "many"))
for name in names:
    os.stat(os.path.join(root, "many", name))
out["stat"] = {"files": len(names), "seconds": time.perf_counter() - t}
print(json.dumps(out))
"""

# Run in the app container first: the files the mount then serves.
PREP_SCRIPT = r"""
import os, sys
size, files = int(sys.argv[1]), int(sys.argv[2])
block = os.urandom(1 << 20)
with open("/data/big", "wb") as f:
    left = size
    while left > 0:
        left -= f.write(block[:min(left, len(block))])
os.makedirs("/data/many", exist_ok=True)
for i in range(files):
    with open(f"/data/many/f{i:05d}", "wb") as f:
        f.write(b"x" * 100)
print("ok")
"""



def mount(bench: Bench, ic: Intercept, pod: str) -> None:
    point = ic.info.get("mount_point")  # type: ignore[attr-defined]
    if not point:
        raise Unavailable(f"the intercept reported no mount point ({ic.stderr_tail()[-200:]})")
    # The intercept's tunnel can restart under the steps before (an agent session lost mid-bulk):
    # its mount is then away until the intercept serves again. PathLost has the step re-establish
    # the intercept and run once more, as for any path lost; a bare FileNotFoundError said nothing.
    if not os.path.ismount(point):
        raise PathLost(f"the intercept's mount {point} is not mounted (its tunnel restarting?)")
    size, files = bench.m["mount_bytes"], bench.m["mount_files"]
    kubectl("exec", "-i", pod, "-c", "app", "--", "python3", "-", str(size), str(files), ns=bench.ns,
            input=PREP_SCRIPT, timeout=120 + size / 20e6)
    root = Path(point) / "data"
    cp = subprocess.run([sys.executable, "-c", MOUNT_SCRIPT, str(root), str(size), str(files)],
                        capture_output=True, text=True, timeout=120 + 2 * size / 1e6)
    if cp.returncode != 0 and not os.path.ismount(point):
        raise PathLost(f"the intercept's mount {point} went away during the step: {cp.stderr.strip()[-200:]}")
    if cp.returncode != 0:
        # What the mount shows and which pods exist: the files were put in ``pod``.
        try:
            seen = sorted(os.listdir(root))[:5]
        except OSError as e:
            seen = [f"({type(e).__name__})"]
        pods = [(x["metadata"]["name"], [c["name"] for c in x["spec"]["containers"]],
                 bool(x["metadata"].get("deletionTimestamp")))
                for x in kjson("get", "pods", "-l", "app=bench-app", ns=bench.ns)["items"]]
        raise Unavailable(f"mount I/O failed: {cp.stderr.strip()[-200:]}; files put in pod {pod}; the mount's "
                          f"data/ shows {seen}; pods (name, containers, deleting): {pods}")
    r = json.loads(cp.stdout)
    bench.put("mount", "read", {"MBps": r["read"]["bytes"] / r["read"]["seconds"] / 1e6, **r["read"]})
    bench.put("mount", "write", {"MBps": r["write"]["bytes"] / r["write"]["seconds"] / 1e6, **r["write"]})
    bench.put("mount", "stat", {**r["stat"], "us_per_file": r["stat"]["seconds"] / max(r["stat"]["files"], 1) * 1e6})


# Run in the app container for the peer: OpenSSH's sftp-server (a C program, copied from the
# laptop) for each connection to 127.0.0.1, on a port read back from this script's first line.
PEER_SERVER = r"""
import os, socket, subprocess, sys, threading
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()  # ends with our kubectl
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    subprocess.Popen([sys.argv[1]], stdin=c.fileno(), stdout=c.fileno()); c.close()
"""
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")  # Debian's openssh-sftp-server


def mount_peer(bench: Bench, pod: str) -> None:
    """The mount's peer in the same position: sshfs with tpenv's own options, straight to OpenSSH's
    C sftp-server in the same app container over a plain `kubectl port-forward` (no SSH, no
    agent, no tunnel of ours), reading the same file the tpenv mount read. Its ratio to the
    port-forward's bulk says what sshfs and FUSE leave of a pipe; tpenv's mount / this row says
    what tpenv costs on top (docs/performance.md, "the SFTP mount rows")."""
    if not SFTP_SERVER.exists():
        raise Unavailable(f"{SFTP_SERVER} is missing: install openssh-sftp-server (devspace.py setup does)")
    remote = "/tmp/tpenv-bench-sftp-server"
    subprocess.run([kubectl_binary(), "-n", bench.ns, "exec", "-i", pod, "-c", "app", "--", "sh", "-c",
                    f"cat > {remote} && chmod 755 {remote}"], input=SFTP_SERVER.read_bytes(),
                   capture_output=True, timeout=60, check=True)
    server = subprocess.Popen([kubectl_binary(), "-n", bench.ns, "exec", "-i", pod, "-c", "app", "--", "python3", "-c",
                               PEER_SERVER, remote], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    pf = point = None
    try:
        line = server.stdout.readline().strip()
        if not line.isdigit():
            raise Unavailable(f"the peer's sftp-server listener did not start in {pod} ({line!r})")
        pf = PortForward(bench.ns, pod, int(line))
        point = bench.tmp / "peer-mnt"
        point.mkdir(exist_ok=True)
        m = load_settings().mounts  # TPENV_MOUNTS_* as tpenv reads them, so an A/B run moves both mounts
        opts = [*sshfs_mount_options(m.cache_seconds, m.read_size), f"directport={pf.port}"]
        cp = subprocess.run(["sshfs", "-o", ",".join(opts), "127.0.0.1:/data", str(point)],
                            capture_output=True, text=True, timeout=30)
        if cp.returncode != 0:
            raise Unavailable(f"sshfs to the peer's sftp-server failed: {cp.stderr.strip()[-200:]}")
        # The same kernel read-ahead as tpenv's mount (SshfsMount._read_ahead), so the two differ
        # only in what carries the SFTP: the setting is the kernel's, not tpenv's protocol.
        os.statvfs(point)  # waits for FUSE's INIT, which would lower the read-ahead again (mounts.py)
        device = mount_device(point)
        ra = raise_read_ahead(device, m.read_ahead_kb)[1] if device and m.read_ahead_kb else "left"
        bench.notes.append(f"mount peer: kernel read-ahead {ra}")
        size = bench.m["mount_bytes"]
        cp = subprocess.run([sys.executable, "-c", MOUNT_SCRIPT, str(point), str(size), "-1"],
                            capture_output=True, text=True, timeout=120 + 2 * size / 1e6)
        if cp.returncode != 0:
            raise Unavailable(f"reading through the peer's mount failed: {cp.stderr.strip()[-200:]}")
        r = json.loads(cp.stdout)["read"]
        if r["bytes"] != size:
            raise Unavailable(f"the peer's mount read {r['bytes']} bytes of {size}")
        bench.put("mount", "read_peer", {"MBps": r["bytes"] / r["seconds"] / 1e6, **r})
    finally:
        if point is not None and os.path.ismount(point):
            subprocess.run(["fusermount3", "-u", "-z", str(point)], capture_output=True, timeout=30)
        if pf is not None:
            pf.stop()
        server.stdin.close()  # the listener in the pod ends with its stdin
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
