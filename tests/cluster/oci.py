"""A small OCI image-layout writer (stdlib only), so images are built here and never pulled.

An image is a list of gzip layers, a config and a manifest, written as an OCI
image layout inside one tar file that `ctr -n k8s.io images import` reads:

    oci-layout                 {"imageLayoutVersion": "1.0.0"}
    index.json                 one manifest descriptor per image name, each with
                               the io.containerd.image.name annotation (ctr uses it
                               as the image name) and org.opencontainers.image.ref.name
    blobs/sha256/<hex>         layers, config, manifest

Everything is deterministic: entries in a fixed order, fixed mtimes and root
owners for files taken from a directory, gzip without a timestamp or name. The
same input gives the same bytes, hence the same digests, which is what lets
the importer skip an image containerd already has.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

# Files from a directory get this mtime (1980-01-01: old enough for zip-based
# tools, not 0 so nothing mistakes it for "unset").
MTIME = 315532800

MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
ANNOT_CONTAINERD_NAME = "io.containerd.image.name"
ANNOT_REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class Layer:
    """A finished layer blob on disk: gzip bytes at `path`."""

    path: Path
    digest: str  # sha256 of the gzip bytes (what the manifest names)
    diff_id: str  # sha256 of the uncompressed tar (what the config names)
    size: int

    def to_json(self) -> dict:
        return {"path": str(self.path), "digest": self.digest, "diff_id": self.diff_id, "size": self.size}

    @classmethod
    def from_json(cls, d: dict) -> "Layer":
        return cls(Path(d["path"]), d["digest"], d["diff_id"], d["size"])


class _HashingWriter:
    """A write-only file that hashes and counts what goes through it (tarfile and gzip need write/tell)."""

    def __init__(self, inner):
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        if self.inner is not None:
            self.inner.write(b)
        return len(b)


class LayerWriter:
    """Builds one layer tar (gzip) entry by entry, computing digest and diff_id on the fly.

    Callers add entries in a deterministic order. Parent directories of added
    files are created (0755, root) when the caller did not add them first.
    """

    def __init__(self, out: Path, compresslevel: int = 6):
        self.out = Path(out)
        self._raw = open(self.out, "wb")
        self._gz_hash = _HashingWriter(self._raw)
        # filename="" and mtime=0: no name or time in the gzip header.
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._gz_hash, compresslevel=compresslevel, mtime=0)
        self._tar_hash = _HashingWriter(self._gz)
        self._tar = tarfile.open(fileobj=self._tar_hash, mode="w", format=tarfile.PAX_FORMAT)
        self._dirs: set[str] = set()

    # -- entries with fixed metadata ------------------------------------------------

    @staticmethod
    def _info(name: str, type_: bytes, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = type_
        ti.mode = mode
        ti.mtime = MTIME
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self._dirs:
                self.add_dir(d)

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        name = _clean(name)
        self._parents(name)
        if name in self._dirs:
            return
        self._dirs.add(name)
        self._tar.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = _clean(name)
        self._parents(name)
        ti = self._info(name, tarfile.REGTYPE, mode)
        ti.size = len(data)
        self._tar.addfile(ti, io.BytesIO(data))

    def add_symlink(self, name: str, target: str) -> None:
        name = _clean(name)
        self._parents(name)
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self._tar.addfile(ti)

    def add_tree(self, src: Path, prefix: str, exclude: Callable[[str], bool] | None = None) -> None:
        """Add the directory `src` at `prefix` in the layer: sorted, fixed mtime, root-owned.

        Modes are normalized to 0755 (directories, executables) or 0644; symlinks stay symlinks;
        `exclude(relative_path)` drops an entry (and, for a directory, what is under it).
        """
        src = Path(src)
        prefix = _clean(prefix)
        if prefix:
            self.add_dir(prefix)
        for dirpath, dirnames, filenames in os.walk(src):
            rel_dir = os.path.relpath(dirpath, src)
            rel_dir = "" if rel_dir == "." else rel_dir
            dirnames.sort()
            kept = []
            for d in dirnames:
                rel = os.path.join(rel_dir, d)
                if exclude and exclude(rel):
                    continue
                full = os.path.join(dirpath, d)
                if os.path.islink(full):  # os.walk lists symlinks to dirs as dirs
                    filenames.append(d)
                    continue
                kept.append(d)
                self.add_dir(_join(prefix, rel), 0o755)
            dirnames[:] = kept
            for f in sorted(filenames):
                rel = os.path.join(rel_dir, f)
                if exclude and exclude(rel):
                    continue
                full = os.path.join(dirpath, f)
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    self.add_symlink(_join(prefix, rel), os.readlink(full))
                elif stat.S_ISREG(st.st_mode):
                    # Only the executable bit is taken from the disk: the builder's umask must not matter.
                    mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
                    self.add_file(_join(prefix, rel), Path(full).read_bytes(), mode)
                # sockets, fifos, devices: never part of an image built from a directory

    # -- entries copied from a rootfs tarball ---------------------------------------

    def add_tarball(self, src: Path, exclude: Callable[[str], bool] | None = None) -> None:
        """Copy every entry of a rootfs tarball in its order, keeping mode, mtime and numeric owners.

        A rootfs needs its owners (setgid tools, /var/mail); names are dropped so
        only the numbers count, as containerd applies them.
        """
        with tarfile.open(src, "r:*") as tf:
            for ti in tf:
                name = _clean(ti.name)
                if not name or (exclude and exclude(name)):
                    continue
                if ".." in name.split("/"):
                    raise ValueError(f"{src}: entry {ti.name!r} leaves the root")
                ti.name = name
                ti.uname = ti.gname = ""
                # Dropped: owner names, sub-second times, xattrs (nothing in our rootfs needs
                # file capabilities); tarfile writes a fresh pax header for long names.
                ti.pax_headers = {}
                if ti.islnk():
                    ti.linkname = _clean(ti.linkname)
                if ti.isdir():
                    self._dirs.add(name)
                fobj = tf.extractfile(ti) if ti.isreg() else None
                self._tar.addfile(ti, fobj)

    def close(self) -> Layer:
        self._tar.close()
        self._gz.close()
        self._raw.close()
        return Layer(self.out, "sha256:" + self._gz_hash.sha.hexdigest(), "sha256:" + self._tar_hash.sha.hexdigest(), self._gz_hash.size)

    def __enter__(self) -> "LayerWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._raw.closed:
            self._tar.close()
            self._gz.close()
            self._raw.close()


def _clean(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./") or name.startswith("/"):
        name = name[2:] if name.startswith("./") else name[1:]
    return name.rstrip("/") if name not in (".", "") else ""


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _dumps(obj) -> bytes:
    # Canonical JSON: sorted keys, no spaces, so the digest depends only on content.
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def image_config(
    layers: Iterable[Layer],
    *,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    workdir: str = "/",
    user: str = "",
    labels: dict[str, str] | None = None,
    exposed_ports: list[str] | None = None,
    arch: str = "amd64",
) -> dict:
    cfg: dict = {"Env": list(env or []), "WorkingDir": workdir}
    if entrypoint is not None:
        cfg["Entrypoint"] = entrypoint
    if cmd is not None:
        cfg["Cmd"] = cmd
    if user:
        cfg["User"] = user
    if labels:
        cfg["Labels"] = dict(labels)
    if exposed_ports:
        cfg["ExposedPorts"] = {p: {} for p in exposed_ports}
    return {
        "architecture": arch,
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
        # A fixed creation time keeps the config digest stable.
        "created": "1980-01-01T00:00:00Z",
        "history": [{"created": "1980-01-01T00:00:00Z", "created_by": "tpenv tests/cluster/oci.py"} for _ in layers],
    }


def split_ref(name: str) -> tuple[str, str]:
    """'registry.k8s.io/pause:3.10' -> ('registry.k8s.io/pause', '3.10')."""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, "latest"


def write_image(out: Path, names: list[str], layers: list[Layer], config: dict) -> str:
    """Write the OCI layout tarball at `out` (atomically) for one image under several names.

    Returns the manifest digest, which is what containerd reports as the image's digest.
    """
    arch = config.get("architecture", "amd64")
    cfg_bytes = _dumps(config)
    cfg_digest = "sha256:" + hashlib.sha256(cfg_bytes).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cfg_digest, "size": len(cfg_bytes)},
        "layers": [{"mediaType": MT_LAYER, "digest": l.digest, "size": l.size} for l in layers],
    }
    man_bytes = _dumps(manifest)
    man_digest = "sha256:" + hashlib.sha256(man_bytes).hexdigest()
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            {
                "mediaType": MT_MANIFEST,
                "digest": man_digest,
                "size": len(man_bytes),
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {ANNOT_CONTAINERD_NAME: n, ANNOT_REF_NAME: split_ref(n)[1]},
            }
            for n in names
        ],
    }
    out = Path(out)
    # A private temporary name: two writers of the same image never mix their bytes.
    fd, tmp_name = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_layout(tmp, index, layers, (cfg_digest, cfg_bytes), (man_digest, man_bytes))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return man_digest


def _write_layout(tmp: Path, index: dict, layers: list[Layer], cfg: tuple[str, bytes], man: tuple[str, bytes]) -> None:
    (cfg_digest, cfg_bytes), (man_digest, man_bytes) = cfg, man
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        def put(name: str, data: bytes | None = None, path: Path | None = None, dir_: bool = False) -> None:
            ti = tarfile.TarInfo(name)
            ti.mtime = MTIME
            ti.uid = ti.gid = 0
            if dir_:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif path is not None:
                ti.mode, ti.size = 0o644, path.stat().st_size
                with open(path, "rb") as f:
                    tf.addfile(ti, f)
            else:
                ti.mode, ti.size = 0o644, len(data)
                tf.addfile(ti, io.BytesIO(data))

        put("oci-layout", _dumps({"imageLayoutVersion": "1.0.0"}))
        put("index.json", _dumps(index))
        put("blobs", dir_=True)
        put("blobs/sha256", dir_=True)
        seen = set()
        for l in layers:
            if l.digest not in seen:  # the same layer twice is stored once
                seen.add(l.digest)
                put("blobs/sha256/" + l.digest.split(":", 1)[1], path=l.path)
        put("blobs/sha256/" + cfg_digest.split(":", 1)[1], cfg_bytes)
        put("blobs/sha256/" + man_digest.split(":", 1)[1], man_bytes)


def read_layout(path: Path) -> dict:
    """Parse a layout tarball back into {'index', 'manifests': {digest: m}, 'configs': {digest: c}, 'blobs': {digest: size}}.

    Used by tests and by the importer to learn the digests an image tarball holds.
    """
    out: dict = {"index": None, "manifests": {}, "configs": {}, "blobs": {}, "layout": None}
    with tarfile.open(path, "r") as tf:
        members = {m.name: m for m in tf}

        def read(name: str) -> bytes:
            return tf.extractfile(members[name]).read()

        out["layout"] = json.loads(read("oci-layout"))
        out["index"] = json.loads(read("index.json"))
        for name, m in members.items():
            if name.startswith("blobs/sha256/") and m.isreg():
                out["blobs"]["sha256:" + name.rsplit("/", 1)[1]] = m.size
        for d in out["index"]["manifests"]:
            man = json.loads(read("blobs/sha256/" + d["digest"].split(":", 1)[1]))
            out["manifests"][d["digest"]] = man
            c = man["config"]["digest"]
            out["configs"][c] = json.loads(read("blobs/sha256/" + c.split(":", 1)[1]))
    return out


def bad_blobs(path: Path) -> list[str]:
    """Names of the blobs whose content does not hash to their name (empty when the layout is sound)."""
    bad = []
    with tarfile.open(path, "r") as tf:
        for m in tf:
            if m.isreg() and m.name.startswith("blobs/sha256/"):
                h = hashlib.sha256()
                f = tf.extractfile(m)
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                if h.hexdigest() != m.name.rsplit("/", 1)[1]:
                    bad.append(m.name)
    return bad
