#!/usr/bin/env python3
"""The local cluster's images, built on this machine and imported into containerd (stdlib only).

There is no registry and no Docker engine: every image is an OCI-layout tarball
written by oci.py, cached under ~/.cache/tpenv/images ($TPENV_CACHE/images),
keyed by a hash of its inputs, and imported with `ctr -n k8s.io images import`.

    registry.k8s.io/pause:3.10   pause.c, gcc -static
    (shared base layer)          Debian bookworm minbase + python3, curl, ca-certificates (debootstrap)
    tpenv/testapp:dev            base + h2, grpcio + tests/cluster/apps (tpenv-echo, tpenv-get)
    tpenv/agent:<version>, :dev  base + asyncssh, cryptography, h2 + agent/tpenv_agent

    python3 tests/cluster/images.py build     build (or reuse) every image, print the tarballs
    python3 tests/cluster/images.py import    build, then import into containerd
    python3 tests/cluster/images.py ref       print the agent image reference
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import oci  # noqa: E402  (stdlib-only sibling module)

PAUSE_REF = "registry.k8s.io/pause:3.10"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cache_dir() -> Path:
    root = os.environ.get("TPENV_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "tpenv"
    d = base / "images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


def _tool_hash() -> str:
    # The writer's own code is an input of every image: a fix there rebuilds them.
    return _hash((HERE / "oci.py").read_bytes())


def _slug(ref: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", ref)


def _cached(stem: str, key: str, suffix: str) -> Path:
    return cache_dir() / f"{stem}-{key[:16]}{suffix}"


def _prune(stem: str, keep: Path, suffix: str) -> None:
    """Drop older builds of the same thing so the cache does not grow with every edit."""
    for p in cache_dir().glob(f"{stem}-*{suffix}"):
        if p != keep and re.fullmatch(re.escape(stem) + r"-[0-9a-f]{16}" + re.escape(suffix), p.name):
            p.unlink(missing_ok=True)


@contextmanager
def _lock():
    # Two `cluster up`s (or a test and a CLI run) must not write the same files at once.
    with open(cache_dir() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


# --- pause ---------------------------------------------------------------------------


def build_pause(log=print) -> Path:
    src = (HERE / "pause.c").read_bytes()
    key = _hash("pause-v1", src, _tool_hash())
    out = _cached(_slug(PAUSE_REF), key, ".oci.tar")
    if out.exists():
        return out
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tpenv-pause-") as tmp:
        binary = Path(tmp) / "pause"
        _run(["gcc", "-static", "-Os", "-Wall", "-o", str(binary), str(HERE / "pause.c")])
        _run(["strip", str(binary)])
        with oci.LayerWriter(Path(tmp) / "layer.tar.gz") as lw:
            lw.add_file("pause", binary.read_bytes(), 0o755)
            layer = lw.close()
        # Same user and entrypoint as the upstream pause image.
        cfg = oci.image_config([layer], entrypoint=["/pause"], env=[PATH_ENV], user="65535:65535")
        oci.write_image(out, [PAUSE_REF], [layer], cfg)
    _prune(_slug(PAUSE_REF), out, ".oci.tar")
    log(f"images: built {PAUSE_REF} in {time.monotonic() - t0:.1f}s ({out.stat().st_size // 1024} KiB)")
    return out


# --- build and import ------------------------------------------------------------------


def build_all(log=print) -> list[Path]:
    """Build (or reuse from the cache) every image; return the OCI tarballs, pause first."""
    with _lock():
        return [build_pause(log)]


def image_names(path: Path) -> dict[str, str]:
    """{image name: manifest digest} from an OCI layout tarball's index.json (read without scanning blobs)."""
    import json
    import tarfile

    with tarfile.open(path, "r") as tf:
        for m in tf:
            if m.name == "index.json":
                index = json.loads(tf.extractfile(m).read())
                return {
                    d["annotations"][oci.ANNOT_CONTAINERD_NAME]: d["digest"]
                    for d in index["manifests"]
                    if oci.ANNOT_CONTAINERD_NAME in d.get("annotations", {})
                }
    raise ValueError(f"{path}: no index.json, not an OCI layout tarball")


def present_images(address: str = DEFAULT_ADDRESS) -> dict[str, str]:
    """{image name: target digest} of what containerd's k8s.io namespace holds."""
    out = subprocess.run(
        ["ctr", "-a", address, "-n", "k8s.io", "images", "ls"], check=True, capture_output=True, text=True
    ).stdout
    images = {}
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 3 and cols[2].startswith("sha256:"):
            images[cols[0]] = cols[2]
    return images


def import_all(paths: list[Path], log=print, address: str = DEFAULT_ADDRESS) -> None:
    """Import each tarball into containerd's k8s.io namespace, skipping images it already has (same digest)."""
    have = present_images(address)
    for p in paths:
        want = image_names(Path(p))
        if want and all(have.get(n) == d for n, d in want.items()):
            continue
        t0 = time.monotonic()
        _run(["ctr", "-a", address, "-n", "k8s.io", "images", "import", str(p)], stdout=subprocess.DEVNULL)
        log(f"images: imported {', '.join(sorted(want))} in {time.monotonic() - t0:.1f}s")


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "build"
    address = os.environ.get("CONTAINERD_ADDRESS", DEFAULT_ADDRESS)
    if "--address" in argv:
        address = argv[argv.index("--address") + 1]
    if cmd == "build":
        t0 = time.monotonic()
        for p in build_all():
            print(p)
        print(f"images: build_all took {time.monotonic() - t0:.1f}s", file=sys.stderr)
        return 0
    if cmd == "import":
        import_all(build_all(), address=address)
        return 0
    print(__doc__.strip())
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
