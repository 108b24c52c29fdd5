"""The SFTP volume mount of a global intercept, read through from the laptop: sequential read and
write of a large file, and a stat of every file of a directory, against files put in the app pod."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.cluster_setup import kjson, kubectl
from bench.common import PathLost, Unavailable
from bench.processes import Intercept
from bench.session import Bench

# Run on the laptop against the mount point: what an editor or a test run does with remote files.
MOUNT_SCRIPT = r"""
import json, os, sys, time
root, size, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
t = time.perf_counter(); n = 0
with open(os.path.join(root, "big"), "rb", buffering=0) as f:
    while True:
        b = f.read(1 << 20)
        if not b: break
        n += len(b)
out["read"] = {"bytes": n, "seconds": time.perf_counter() - t}
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

