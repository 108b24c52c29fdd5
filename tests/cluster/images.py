#!/usr/bin/env python3
"""The local cluster's images, built on this machine and imported into containerd (stdlib only).

There is no registry and no Docker engine: every image is an OCI-layout tarball
written by oci.py, cached under ~/.cache/tpenv/images ($TPENV_CACHE/images),
keyed by a hash of its inputs, and imported with `ctr -n k8s.io images import`.

    registry.k8s.io/pause:3.10   pause.c, gcc -static
    (shared base layer)          Debian bookworm minbase + python3, curl, ca-certificates (debootstrap)
    tpenv/testapp:<hash>         base + h2, grpcio + wrk (Debian) + tests/cluster/apps (tpenv-echo, tpenv-get)
      (also :dev)                hash = of those inputs (testapp_version()); tests use testapp_image_ref()
    tpenv/local-path-provisioner:v0.0.30
                                 base + rancher's local-path-provisioner (build.py); also its helper pods' image
    tpenv/haproxy:dev            base + haproxy (Debian): the bench's compiled-proxy peer of the agent
    tpenv/agent:<version>        base + asyncssh, cryptography, h2, uvloop + iptables (Debian) + agent/tpenv_agent
      (also :dev and :0.1.0)     version = <project version>-<hash of the agent sources>

    python3 tests/cluster/images.py build     build (or reuse) every image, print the tarballs
    python3 tests/cluster/images.py import [--address SOCK]
                                              build, then import into containerd (default: $CONTAINERD_ADDRESS,
                                              else the local cluster's socket if it runs, else /run/containerd)
    python3 tests/cluster/images.py ref       print the agent image reference
    python3 tests/cluster/images.py testapp-ref
                                              print the test app image reference
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
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
    """Drop older builds of the same thing so the cache does not grow with every edit.

    Files touched in the last ten minutes stay: another process may be importing one.
    """
    for p in cache_dir().glob(f"{stem}-*{suffix}"):
        if p != keep and re.fullmatch(re.escape(stem) + r"-[0-9a-f]{16}" + re.escape(suffix), p.name):
            try:
                if time.time() - p.stat().st_mtime > 600:
                    p.unlink()
            except FileNotFoundError:
                pass


_process_lock = threading.RLock()
_lock_depth = 0


@contextmanager
def _lock():
    """One builder at a time across processes (a `cluster up`, a test calling build_agent, the CLI).

    Reentrant inside a process: build_all holds it while calling build_agent, which takes it too.
    """
    global _lock_depth
    with _process_lock:
        if _lock_depth:
            _lock_depth += 1
            try:
                yield
            finally:
                _lock_depth -= 1
            return
        with open(cache_dir() / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            _lock_depth = 1
            try:
                yield
            finally:
                _lock_depth = 0
                fcntl.flock(f, fcntl.LOCK_UN)


def _locked(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kw):
        with _lock():
            return fn(*args, **kw)

    return wrapper


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    # pip as root is expected here (it writes to our cache, not the system): no warning about it.
    kw.setdefault("env", {**os.environ, "PIP_ROOT_USER_ACTION": "ignore"})
    return subprocess.run(cmd, check=True, **kw)


# --- pause ---------------------------------------------------------------------------


@_locked
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


# --- the shared Debian base -------------------------------------------------------------

SUITE = "bookworm"
BASE_PACKAGES = ["python3", "ca-certificates", "curl"]
# Bump when the cleanup below changes: the rootfs tarball is keyed by it.
BASE_RECIPE = "base-v1"
# What a running container never needs; dropping it keeps the base near half its size.
BASE_PRUNE = [
    "dev/*", "proc/*", "sys/*", "run/*", "tmp/*", "var/tmp/*",
    "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*",
    "var/cache/debconf/*-old", "var/lib/dpkg/*-old", "var/log/*",
    "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*", "usr/share/lintian/*",
    "etc/resolv.conf", "etc/hostname",
]


def apt_mirror(files: list[Path] | None = None) -> str:
    """The Debian mirror this machine's apt uses for the suite (deb822 or one-line sources)."""
    if files is None:
        files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split():
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    return "http://deb.debian.org/debian"


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/mounts") as f:
        mounts = [line.split()[1].replace("\\040", " ") for line in f]
    return sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """Remove a build directory, unmounting what debootstrap left mounted in it first.

    debootstrap mounts /proc and /sys in its target; a killed run can leave them, and
    removing the tree must never walk into the host's /proc or /sys.
    """
    for m in _mounts_under(path):
        subprocess.run(["umount", "-l", m], capture_output=True)
    if _mounts_under(path):
        raise RuntimeError(f"{path} still has mounts ({', '.join(_mounts_under(path))}): not removing it")
    shutil.rmtree(path, ignore_errors=True)


def base_rootfs(log=print) -> Path:
    """Debian bookworm minbase with python3, as a rootfs tarball (numeric owners, original mtimes)."""
    return debian_rootfs(f"rootfs-{SUITE}", BASE_PACKAGES, BASE_RECIPE, log)


def debian_rootfs(stem: str, packages: list[str], recipe: str, log=print, finish=None) -> Path:
    """Debian minbase with ``packages`` installed by debootstrap (maintainer scripts run: a real
    installation, unlike debs_layer), pruned as BASE_PRUNE says, as a cached rootfs tarball.

    ``finish(root)``, when given, changes the tree before it is packed; ``recipe`` names it in the key.
    """
    key = _hash(recipe, SUITE, *packages, *BASE_PRUNE)
    out = _cached(stem, key, ".tar")
    if out.exists():
        return out
    mirror = apt_mirror()
    log(f"images: debootstrap {SUITE} + {' '.join(packages)} from {mirror} (a minute or more)")
    t0 = time.monotonic()
    # Leftovers of an interrupted build (we hold the lock: nobody else is building).
    for stale in cache_dir().glob("tpenv-rootfs-*"):
        _remove_tree(stale)
    tmp = tempfile.mkdtemp(prefix="tpenv-rootfs-", dir=cache_dir())
    try:
        root = Path(tmp) / "root"
        cmd = ["debootstrap", "--variant=minbase", "--include=" + ",".join(packages), SUITE, str(root), mirror]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:  # once more from scratch: a mirror hiccup should not fail a cold CI run
            log(f"images: debootstrap failed (exit {r.returncode}), retrying once")
            _remove_tree(root)
            r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"debootstrap failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
        if _mounts_under(root):
            raise RuntimeError(f"debootstrap left mounts in {root}: {_mounts_under(root)}")
        for pattern in BASE_PRUNE:
            for p in root.glob(pattern):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        # Keep only the licence files of the docs.
        for p in (root / "usr/share/doc").rglob("*"):
            if p.is_file() and p.name != "copyright":
                p.unlink()
        (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
        if finish is not None:
            finish(root)
        tmp_out = Path(tmp) / "rootfs.tar"
        _run(["tar", "--numeric-owner", "--sort=name", "-cf", str(tmp_out), "-C", str(root), "."])
        os.replace(tmp_out, out)
    finally:
        _remove_tree(Path(tmp))
    _prune(stem, out, ".tar")
    log(f"images: rootfs {stem} in {time.monotonic() - t0:.0f}s ({out.stat().st_size >> 20} MiB)")
    return out


def _cached_layer(stem: str, key: str, fill, log=print) -> oci.Layer:
    """A layer cached as <stem>-<key>.tar.gz plus its digests in .json; `fill(LayerWriter)` builds it."""
    out = _cached(stem, key, ".tar.gz")
    meta = out.with_name(out.name[: -len(".tar.gz")] + ".json")
    if out.exists() and meta.exists():
        d = json.loads(meta.read_text())
        if out.stat().st_size == d["size"]:  # a cheap check against a truncated file
            return oci.Layer(out, d["digest"], d["diff_id"], d["size"])
    t0 = time.monotonic()
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=cache_dir())
    os.close(fd)
    try:
        with oci.LayerWriter(Path(tmp)) as lw:
            fill(lw)
            layer = lw.close()
        meta.unlink(missing_ok=True)  # never a .json describing another .tar.gz
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    layer = oci.Layer(out, layer.digest, layer.diff_id, layer.size)
    meta.write_text(json.dumps(layer.to_json()))
    _prune(stem, out, ".tar.gz")
    _prune(stem, meta, ".json")
    log(f"images: layer {stem} in {time.monotonic() - t0:.1f}s ({_size(layer.size)} gzip)")
    return layer


def _cached_image(names: list[str], layers: list[oci.Layer], config: dict, log=print, t0: float | None = None) -> Path:
    """The image tarball, keyed by its layers' digests, config and names: a warm call only stats a file."""
    stem = _slug(names[0].rsplit(":", 1)[0])
    names = [n for ref in names for n in normalized_names(ref)]
    key = _hash("image", json.dumps(config, sort_keys=True), *names, *(l.digest for l in layers))
    out = _cached(stem, key, ".oci.tar")
    if not out.exists():
        oci.write_image(out, names, layers, config)
        _prune(stem, out, ".oci.tar")
        took = f" in {time.monotonic() - t0:.1f}s" if t0 is not None else ""
        short = ", ".join(n for n in names if not n.startswith("docker.io/"))
        log(f"images: built {short}{took} ({_size(sum(l.size for l in layers))} compressed)")
    return out


def normalized_names(ref: str) -> list[str]:
    """`ref`, plus its docker.io/ form when it names no registry host.

    The kubelet asks containerd's CRI for the normalized reference (tpenv/agent:dev is
    docker.io/tpenv/agent:dev), and the CRI looks images up by that exact name; ctr and
    people use the short one. Both names point at the same manifest.
    """
    first = ref.split("/", 1)[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost"):
        return [ref]
    return [ref, "docker.io/" + (ref if "/" in ref else f"library/{ref}")]


def _size(n: int) -> str:
    return f"{n / 1048576:.1f} MiB" if n >= 1048576 else f"{n / 1024:.0f} KiB"


@_locked
def base_layer(log=print) -> oci.Layer:
    """The base rootfs as a gzip layer, shared by every Python image (containerd stores it once)."""
    rootfs = base_rootfs(log)
    key = _hash("base-layer", rootfs.name, _tool_hash())
    return _cached_layer("layer-base", key, lambda lw: lw.add_tarball(rootfs), log)


# --- Python packages from PyPI, downloaded on the host ---------------------------------

PY_VERSION = "3.11"  # bookworm's python3
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"  # on Debian's sys.path, owned by no package
# bookworm has glibc 2.36. pip does not expand an explicit manylinux_2_N platform to the older
# ones: 2_28 is listed for wheels built only for it (google-re2).
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux_2_36_x86_64"]
# Pinned so an image built on another day or machine has the same packages.
TESTAPP_PACKAGES = ["h2==4.4.1", "grpcio==1.85.1"]
# uvloop: the sidecar's event loop (tpenv_agent/main.py; it falls back to asyncio's without it).
# google-re2: header/path patterns in linear time (tpenv_agent/registry.py).
AGENT_PACKAGES = ["asyncssh==2.24.1", "cryptography==50.0.2", "h2==4.4.1", "uvloop==0.22.1",
                  "google-re2==1.1.20251105"]


def _pip() -> list[str]:
    """A Python with pip on the host: this one, else the project's venv (Debian's python3 may lack pip)."""
    for py in (sys.executable, str(REPO / ".venv" / "bin" / "python"), "python3"):
        if py and subprocess.run([py, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return [py, "-m", "pip"]
    raise RuntimeError("no pip on this machine: install python3-pip (the images' packages come from PyPI)")


def _target_args() -> list[str]:
    args = ["--python-version", PY_VERSION, "--implementation", "cp", "--only-binary=:all:"]
    for plat in PLATFORMS:
        args += ["--platform", plat]
    return args


def wheels(packages: list[str], log=print) -> Path:
    """The wheels for `packages` and their dependencies, for the image's Python, in a cached directory."""
    key = _hash("wheels-v1", PY_VERSION, *PLATFORMS, *packages)

    def fetch(tmp: Path) -> None:
        _run([*_pip(), "download", "-q", *_target_args(), "-d", str(tmp), *packages], stdout=subprocess.DEVNULL)

    return _downloaded_once("wheels", key, packages, "pip download", fetch, log)


def _downloaded_once(stem: str, key: str, packages: list[str], what: str, fetch, log) -> Path:
    """The cached directory ``<stem>-<key>`` that ``fetch(tmp)`` fills, fetched when missing. It is
    marked complete and moved into place only once whole: an interrupted download is done again,
    never used half."""
    d = cache_dir() / f"{stem}-{key[:16]}"
    if (d / ".complete").exists():
        return d
    log(f"images: {what} {' '.join(packages)}")
    tmp = Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=cache_dir()))
    try:
        fetch(tmp)
        (tmp / ".complete").write_text("\n".join(packages) + "\n")
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def _pyc_tag() -> str:
    # Part of a layer's key: whether (and for which bytecode) it got precompiled here.
    return f"pyc-{sys.version_info[0]}.{sys.version_info[1]}"


def _compile(tree: Path, ddir: str) -> None:
    """Precompile .py files so containers start without compiling (and without writing pyc).

    Only when this Python is the image's minor version (same bytecode). unchecked-hash
    pycs never look at mtimes, which the layer writer rewrites anyway.
    """
    if f"{sys.version_info[0]}.{sys.version_info[1]}" != PY_VERSION:
        return
    # In a child with a fixed hash seed: set constants in the bytecode then come out in
    # the same order every time, so the same sources give the same layer digest.
    code = (
        "import compileall, py_compile, sys\n"
        "ok = compileall.compile_dir(sys.argv[1], quiet=2, ddir=sys.argv[2], workers=1,\n"
        "    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tree), ddir], check=True, env={**os.environ, "PYTHONHASHSEED": "0"})


@_locked
def site_layer(name: str, packages: list[str], log=print) -> oci.Layer:
    """`packages` installed (pip --target, on the host, from the cached wheels) as a dist-packages layer."""
    wheel_dir = wheels(packages, log)
    names = sorted(p.name for p in wheel_dir.glob("*.whl"))
    key = _hash("site-v1", *packages, *names, _tool_hash(), _pyc_tag())

    def fill(lw: oci.LayerWriter) -> None:
        with tempfile.TemporaryDirectory(prefix="site-", dir=cache_dir()) as tmp:
            stage = Path(tmp) / "site"
            _run(
                [*_pip(), "install", "-q", "--no-index", "--find-links", str(wheel_dir), "--no-compile",
                 "--target", str(stage), *_target_args(), *packages],
                stdout=subprocess.DEVNULL,
            )
            shutil.rmtree(stage / "bin", ignore_errors=True)  # console scripts with the host's shebang
            _compile(stage, "/" + SITE_PACKAGES)
            lw.add_tree(stage, SITE_PACKAGES)

    return _cached_layer(f"layer-site-{name}", key, fill, log)


def _tree_hash(root: Path, pattern: str = "*") -> list[bytes]:
    """(relative path, content) of every file under root, in order, without bytecode caches."""
    parts = []
    for p in sorted(root.rglob(pattern), key=lambda p: p.relative_to(root).as_posix()):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
            parts += [p.relative_to(root).as_posix().encode(), p.read_bytes()]
    return parts


def _stage_layer(stem: str, key_parts: list, stage_fill, log=print) -> oci.Layer:
    """A layer from a staging directory that `stage_fill(dir)` writes, precompiled, keyed by key_parts."""
    key = _hash(stem, *key_parts, _tool_hash(), _pyc_tag())

    def fill(lw: oci.LayerWriter) -> None:
        with tempfile.TemporaryDirectory(prefix="stage-", dir=cache_dir()) as tmp:
            stage_fill(Path(tmp))
            _compile(Path(tmp), "/")  # ddir "/" + relative path = the path in the image
            lw.add_tree(Path(tmp), "")

    return _cached_layer(stem, key, fill, log)


BASE_ENV = [PATH_ENV, "LANG=C.UTF-8", "PYTHONUNBUFFERED=1"]


# --- Debian packages on top of the base, for one image ----------------------------------


def debs(packages: list[str], log=print) -> Path:
    """The .deb files of ``packages`` as this machine's apt resolves them (the same suite as the
    base: apt_mirror() found it in its sources), downloaded once into a cached directory."""
    key = _hash("debs-v1", SUITE, *packages)

    def fetch(tmp: Path) -> None:
        os.chmod(tmp, 0o755)  # apt's sandbox user writes here when it can
        r = subprocess.run(["apt-get", "download", "-q", *packages], cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get download {' '.join(packages)} failed (exit {r.returncode}): "
                               f"{r.stderr.strip()[-500:]}; run `apt-get update` and try again")

    return _downloaded_once("debs", key, packages, "apt-get download", fetch, log)


def _merge_usr(stage: Path) -> None:
    """Move /bin, /sbin, /lib* of unpacked packages under /usr, as merged-/usr does on install: in a
    layer, a real ``lib/`` directory would hide the base's /lib -> usr/lib symlink (and with it the
    dynamic loader /lib64 points to), so every binary of the image would fail to start."""
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        src = stage / top
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, stage / "usr" / top, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(src)


@_locked
def debs_layer(name: str, packages: list[str], log=print) -> oci.Layer:
    """``packages`` unpacked (``dpkg-deb -x``) into a layer: their files, not an installation
    (dpkg's database in the image does not list them; maintainer scripts do not run), which is
    enough for self-contained tools. List every dependency the base lacks by hand."""
    deb_dir = debs(packages, log)
    files = sorted(deb_dir.glob("*.deb"))
    key = _hash("debs-layer-v1", *(f.name for f in files), _tool_hash())

    def fill(lw: oci.LayerWriter) -> None:
        with tempfile.TemporaryDirectory(prefix="debs-", dir=cache_dir()) as tmp:
            stage = Path(tmp)
            for f in files:
                _run(["dpkg-deb", "-x", str(f), str(stage)])
            _merge_usr(stage)
            for p in (stage / "usr/share/doc").rglob("*"):  # as in the base: licences only
                if p.is_file() and p.name != "copyright":
                    p.unlink()
            shutil.rmtree(stage / "usr/share/man", ignore_errors=True)
            lw.add_tree(stage, "")

    return _cached_layer(f"layer-debs-{name}", key, fill, log)


# --- tpenv/testapp ----------------------------------------------------------------------

# The fixed alias, for what is run by hand (examples/hello/k8s.yaml) and for branches that still
# name it: every checkout's `cluster up` re-points it, so tests and the bench use the content tag
# (testapp_image_ref(), through tests/kit/apps.py), which no other worktree's import can change.
TESTAPP_REF = "tpenv/testapp:dev"
APPS = HERE / "apps"
# Commands in the image: name -> module in tests/cluster/apps.
APP_COMMANDS = {"tpenv-echo": "echo", "tpenv-get": "get"}
# wrk: a compiled HTTP load generator for the bench's closed loop (bench/run.py, issue 4), so the
# figure measures the path rather than a Python client competing for the same cores. With the
# libraries it needs that the base lacks (its libssl3 and libgcc-s1 are there).
TESTAPP_DEBS = ["wrk", "libluajit-5.1-2", "libluajit-5.1-common"]


def testapp_version() -> str:
    """12 hex of sha256 over what the image holds: tests/cluster/apps (every file), its commands,
    its pip and Debian packages, its env, the base recipe and the image writer (oci.py)."""
    parts = _tree_hash(APPS) + [b"commands", json.dumps(APP_COMMANDS, sort_keys=True).encode()]
    parts += [b"packages", " ".join(TESTAPP_PACKAGES).encode(), b"debs", " ".join(TESTAPP_DEBS).encode()]
    parts += [b"env", " ".join(BASE_ENV).encode(), b"base", f"{SUITE} {BASE_RECIPE} {' '.join(BASE_PACKAGES)}".encode()]
    parts += [b"tool", _tool_hash().encode()]
    return _hash(*parts)[:12]


def testapp_image_ref() -> str:
    return f"tpenv/testapp:{testapp_version()}"


@_locked
def build_testapp(log=print) -> Path:
    t0 = time.monotonic()
    base = base_layer(log)
    site = site_layer("testapp", TESTAPP_PACKAGES, log)
    tools = debs_layer("testapp", TESTAPP_DEBS, log)

    def stage(d: Path) -> None:
        shutil.copytree(APPS, d / "opt/tpenv-apps", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (d / "usr/local/bin").mkdir(parents=True)
        for cmd, mod in APP_COMMANDS.items():
            f = d / "usr/local/bin" / cmd
            f.write_text(
                f"#!/usr/bin/python3\nimport sys\nsys.path.insert(0, '/opt/tpenv-apps')\n"
                f"from {mod} import main\nsys.exit(main())\n"
            )
            f.chmod(0o755)

    apps = _stage_layer("layer-testapp", [*_tree_hash(APPS), *APP_COMMANDS], stage, log)
    cfg = oci.image_config([base, site, tools, apps], cmd=["tpenv-echo"], env=BASE_ENV, exposed_ports=["8080/tcp"])
    return _cached_image([testapp_image_ref(), TESTAPP_REF], [base, site, tools, apps], cfg, log, t0)


# --- tpenv/local-path-provisioner ---------------------------------------------------------


def local_path_ref() -> str:
    import build  # tests/cluster/build.py: the Go binary, built (and cached) from the module proxy

    return f"tpenv/local-path-provisioner:{build.LOCAL_PATH_VERSION}"


@_locked
def build_local_path(log=print) -> Path:
    """The storage provisioner (tests/cluster/storage.py) on the Debian base: the base's /bin/sh,
    mkdir and rm run its helper pods' setup and teardown scripts, so one image serves both."""
    import build

    t0 = time.monotonic()
    base = base_layer(log)
    binary = build.build_local_path(log)
    key = _hash("local-path-v1", binary.read_bytes(), _tool_hash())

    def fill(lw: oci.LayerWriter) -> None:
        lw.add_file("usr/local/bin/local-path-provisioner", binary.read_bytes(), 0o755)

    layer = _cached_layer("layer-local-path", key, fill, log)
    cfg = oci.image_config([base, layer], entrypoint=["local-path-provisioner"], env=[PATH_ENV], user="65532:65532")
    return _cached_image([local_path_ref()], [base, layer], cfg, log, t0)


# --- tpenv/haproxy -------------------------------------------------------------------------

HAPROXY_REF = "tpenv/haproxy:dev"
# HAProxy, the compiled proxy the bench puts in the agent's place (same pod, same app: issue 13's
# peer row, passthrough req/s through the agent / through HAProxy), with the libraries the base
# lacks (libpcre2, libsystemd0, libcrypt1, libssl3 and libstdc++6 come with it). An image of its
# own rather than in tpenv/testapp: every checkout imports testapp under the same tag.
HAPROXY_DEBS = ["haproxy", "liblua5.3-0", "libopentracing-c-wrapper0", "libopentracing1"]


@_locked
def build_haproxy(log=print) -> Path:
    t0 = time.monotonic()
    base = base_layer(log)
    tools = debs_layer("haproxy", HAPROXY_DEBS, log)
    # -db: foreground, no daemon; the configuration comes from the pod (a ConfigMap).
    cfg = oci.image_config([base, tools], entrypoint=["/usr/sbin/haproxy", "-db"], env=BASE_ENV, user="65532:65532")
    return _cached_image([HAPROXY_REF], [base, tools], cfg, log, t0)


# --- tpenv/agent --------------------------------------------------------------------------

AGENT_PKG = REPO / "agent" / "tpenv_agent"
AGENT_ENV = [*BASE_ENV, "PYTHONDONTWRITEBYTECODE=1"]
AGENT_USER = "65532:65532"  # tpenv_agent.inject.AGENT_UID
# iptables (its nftables backend, iptables-nft) for `tpenv-agent init`, the in-pod redirect
# (agent/tpenv_agent/redirect.py), with the libraries the base lacks; netbase for /etc/protocols.
AGENT_DEBS = ["iptables", "libip4tc2", "libip6tc2", "libxtables12", "libmnl0", "libnetfilter-conntrack3",
              "libnfnetlink0", "libnftnl11", "netbase"]


def project_version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    return m.group(1) if m else "0.0.0"


def agent_version() -> str:
    """'<project version>-<12 hex>': sha256 over agent/tpenv_agent/**/*.py (sorted relative
    paths, each as length-prefixed path then content), then pyproject.toml and AGENT_DEBS."""
    parts = _tree_hash(AGENT_PKG, "*.py") + [b"pyproject.toml", (REPO / "pyproject.toml").read_bytes()]
    # The image's config and packages, not only its code, name the tag.
    parts += [b"user", AGENT_USER.encode(), b"packages", " ".join(AGENT_PACKAGES).encode()]
    parts += [b"debs", " ".join(AGENT_DEBS).encode()]  # the image's Debian tools are part of what a tag stands for
    return f"{project_version()}-{_hash(*parts)[:12]}"


def agent_image_ref() -> str:
    return f"tpenv/agent:{agent_version()}"


@_locked
def build_agent(log=print) -> Path:
    t0 = time.monotonic()
    base = base_layer(log)
    site = site_layer("agent", AGENT_PACKAGES, log)
    tools = debs_layer("agent", AGENT_DEBS, log)
    # The image's own variables, by name (docs/protocol.md §5): the agent leaves them out of the app's env.
    image_env = json.dumps(sorted(e.split("=", 1)[0] for e in AGENT_ENV)) + "\n"

    def stage(d: Path) -> None:
        shutil.copytree(AGENT_PKG, d / SITE_PACKAGES / "tpenv_agent", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (d / "usr/local/bin").mkdir(parents=True)
        launcher = d / "usr/local/bin/tpenv-agent"
        launcher.write_text("#!/usr/bin/python3\nimport sys\nfrom tpenv_agent.main import main\nsys.exit(main())\n")
        launcher.chmod(0o755)
        (d / "etc/tpenv").mkdir(parents=True)
        (d / "etc/tpenv/image-env.json").write_text(image_env)

    # Every file of the package (data files too) is an input of the layer; the version uses the .py files.
    layer = _stage_layer("layer-agent", [*_tree_hash(AGENT_PKG), image_env], stage, log)
    # Non-root (numeric, so the kubelet can check runAsNonRoot); the injector sets the same user,
    # or the app's own non-root one, in the container's securityContext (agent/Dockerfile too).
    cfg = oci.image_config(
        [base, site, tools, layer], entrypoint=["tpenv-agent"], env=AGENT_ENV, user=AGENT_USER,
        labels={"io.tpenv.agent.version": agent_version()},
    )
    # Also tagged :dev (tpenv's settings default) and :<project version> (the injector's
    # default), so every default resolves on the local cluster to this build.
    names = [agent_image_ref(), "tpenv/agent:dev", f"tpenv/agent:{project_version()}"]
    return _cached_image(names, [base, site, tools, layer], cfg, log, t0)


# --- build and import ------------------------------------------------------------------


# Debian packages the builders call: debootstrap, gcc with glibc's static libc, strip.
BUILD_PACKAGES = ["debootstrap", "gcc", "libc6-dev", "binutils"]


def _ensure_tools() -> None:
    """Install the builders' Debian packages when one is missing (through the cluster's packages.py)."""
    have = all(shutil.which(t) for t in ("debootstrap", "gcc", "strip", "tar"))
    if have and Path("/usr/lib/x86_64-linux-gnu/libc.a").exists():
        return
    try:
        import packages  # tests/cluster/packages.py: apt-get install when missing
    except ImportError:
        raise RuntimeError(f"install the Debian packages {' '.join(BUILD_PACKAGES)} to build the images") from None
    packages.ensure(BUILD_PACKAGES)


@_locked
def build_all(log=print) -> list[Path]:
    """Build (or reuse from the cache) every image; return the OCI tarballs, pause first."""
    _ensure_tools()
    return [build_pause(log), build_testapp(log), build_haproxy(log), build_agent(log), build_local_path(log)]


def image_names(path: Path) -> dict[str, str]:
    """{image name: manifest digest} from an OCI layout tarball's index.json (read without scanning blobs)."""
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
    """{image name: target digest} of the complete images in containerd's k8s.io namespace.

    `ctr images check` rather than `ls`: an image whose content went missing (an import
    cut short) shows as incomplete, and is imported again rather than skipped.
    """
    out = subprocess.run(
        ["ctr", "-a", address, "-n", "k8s.io", "images", "check"], check=True, capture_output=True, text=True
    ).stdout
    images = {}
    # Columns: REF TYPE DIGEST STATUS (complete (2/2) | incomplete (1/2)) SIZE UNPACKED
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 4 and cols[2].startswith("sha256:") and cols[3] == "complete":
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
        short = ", ".join(sorted(n for n in want if not n.startswith("docker.io/")))
        log(f"images: imported {short} in {time.monotonic() - t0:.1f}s")


def _local_cluster_address() -> str | None:
    """The local cluster's containerd socket when it runs (tests/cluster/components.py), for the CLI."""
    try:
        import components

        sock = components.containerd_address()
    except Exception:  # noqa: BLE001 - the CLI then falls back to the system socket
        return None
    return str(sock) if Path(sock).is_socket() else None


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "build"
    address = os.environ.get("CONTAINERD_ADDRESS") or _local_cluster_address() or DEFAULT_ADDRESS
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
    if cmd == "ref":
        print(agent_image_ref())
        return 0
    if cmd == "testapp-ref":
        print(testapp_image_ref())
        return 0
    print(__doc__.strip())
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
