"""The OCI layout writer (tests/cluster/oci.py) and the image cache around it (images.py).

containerd is not needed here: the layout is checked against the OCI image
spec's rules (digests are the sha256 of the blobs, diff_ids the sha256 of the
uncompressed layers, the name annotation ctr imports by), and determinism is
checked by building twice. Importing and running the images is e2e
(tests/e2e/test_images.py).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "cluster"))
import images  # noqa: E402
import oci  # noqa: E402


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tree(root: Path, mtime: int) -> Path:
    """A small app directory: nested files, an executable, a symlink, a bytecode cache to leave out."""
    (root / "app" / "lib").mkdir(parents=True)
    (root / "app" / "lib" / "mod.py").write_text("print('hi')\n")
    (root / "app" / "run").write_text("#!/bin/sh\necho run\n")
    (root / "app" / "run").chmod(0o700)  # an odd umask must not leak into the image
    (root / "app" / "lib" / "__pycache__").mkdir()
    (root / "app" / "lib" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"junk")
    (root / "app" / "current").symlink_to("lib")
    for p in root.rglob("*"):
        os.utime(p, (mtime, mtime), follow_symlinks=False)
    return root / "app"


def build(tmp: Path, src: Path, names: list[str]) -> tuple[Path, str]:
    with oci.LayerWriter(tmp / "layer.tar.gz") as lw:
        lw.add_tree(src, "opt/app", exclude=lambda rel: "__pycache__" in rel)
        lw.add_file("etc/tpenv/image-env.json", b'["PATH"]\n')
        layer = lw.close()
    cfg = oci.image_config([layer], entrypoint=["/opt/app/run"], env=["PATH=/usr/bin:/bin"])
    out = tmp / "image.oci.tar"
    return out, oci.write_image(out, names, [layer], cfg)


def blob(tar: tarfile.TarFile, digest: str) -> bytes:
    return tar.extractfile("blobs/sha256/" + digest.split(":", 1)[1]).read()


# --- stage 1: the layout is what the OCI spec and ctr import expect ------------------------


def test_layout_index_manifest_config_and_digests(tmp_path):
    out, man_digest = build(tmp_path, make_tree(tmp_path / "src", 1_700_000_000), ["example.com/demo/app:1.2"])
    with tarfile.open(out) as tf:
        assert json.loads(tf.extractfile("oci-layout").read()) == {"imageLayoutVersion": "1.0.0"}
        index = json.loads(tf.extractfile("index.json").read())
        assert index["schemaVersion"] == 2 and index["mediaType"] == oci.MT_INDEX
        (desc,) = index["manifests"]
        assert desc["annotations"] == {
            "io.containerd.image.name": "example.com/demo/app:1.2",
            "org.opencontainers.image.ref.name": "1.2",
        }
        assert desc["digest"] == man_digest and desc["platform"] == {"architecture": "amd64", "os": "linux"}

        man_bytes = blob(tf, man_digest)
        assert sha(man_bytes) == man_digest and len(man_bytes) == desc["size"]
        man = json.loads(man_bytes)
        assert man["mediaType"] == oci.MT_MANIFEST and man["config"]["mediaType"] == oci.MT_CONFIG

        cfg_bytes = blob(tf, man["config"]["digest"])
        assert sha(cfg_bytes) == man["config"]["digest"] and len(cfg_bytes) == man["config"]["size"]
        cfg = json.loads(cfg_bytes)
        assert cfg["os"] == "linux" and cfg["config"]["Entrypoint"] == ["/opt/app/run"]

        # diff_ids name the uncompressed layers; the manifest names the gzip blobs.
        (ldesc,) = man["layers"]
        gz = blob(tf, ldesc["digest"])
        assert ldesc["mediaType"] == oci.MT_LAYER
        assert sha(gz) == ldesc["digest"] and len(gz) == ldesc["size"]
        assert cfg["rootfs"] == {"type": "layers", "diff_ids": [sha(gzip.decompress(gz))]}


def test_several_names_point_at_one_manifest(tmp_path):
    out, man_digest = build(tmp_path, make_tree(tmp_path / "src", 1), ["tpenv/agent:0.1.0-abc", "tpenv/agent:dev"])
    assert images.image_names(out) == {"tpenv/agent:0.1.0-abc": man_digest, "tpenv/agent:dev": man_digest}
    layout = oci.read_layout(out)
    assert list(layout["manifests"]) == [man_digest]


def test_normalized_names_for_the_cri():
    # The kubelet asks for docker.io/...; names with a registry host stay as they are.
    assert images.normalized_names("tpenv/agent:dev") == ["tpenv/agent:dev", "docker.io/tpenv/agent:dev"]
    assert images.normalized_names("busybox:1") == ["busybox:1", "docker.io/library/busybox:1"]
    assert images.normalized_names("registry.k8s.io/pause:3.10") == ["registry.k8s.io/pause:3.10"]
    assert images.normalized_names("localhost:5000/x:y") == ["localhost:5000/x:y"]


def test_split_ref():
    assert oci.split_ref("registry.k8s.io/pause:3.10") == ("registry.k8s.io/pause", "3.10")
    assert oci.split_ref("localhost:5000/app") == ("localhost:5000/app", "latest")
    assert oci.split_ref("tpenv/agent:dev") == ("tpenv/agent", "dev")


# --- stage 2: layer entries carry fixed metadata, in a fixed order --------------------------


def layer_entries(out: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(out) as tf:
        man = json.loads(blob(tf, images.image_names(out)["x/y:z"]))
        gz = blob(tf, man["layers"][0]["digest"])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(gz))) as lt:
        return lt.getmembers()


def test_layer_entries_are_normalized(tmp_path):
    out, _ = build(tmp_path, make_tree(tmp_path / "src", 1_650_000_000), ["x/y:z"])
    entries = layer_entries(out)
    by_name = {e.name: e for e in entries}
    # Parents come before children, and every entry is root-owned with the fixed mtime.
    names = [e.name for e in entries]
    for i, n in enumerate(names):
        if "/" in n:
            assert n.rsplit("/", 1)[0] in names[:i], f"{n} comes before its directory"
    assert len(set(names)) == len(names)
    assert all(e.uid == 0 and e.gid == 0 and e.uname == "" and e.mtime == oci.MTIME for e in entries)
    assert by_name["opt/app/run"].mode == 0o755
    assert by_name["opt/app/lib/mod.py"].mode == 0o644
    assert by_name["opt/app/current"].issym() and by_name["opt/app/current"].linkname == "lib"
    assert by_name["etc/tpenv"].isdir()
    assert not any("__pycache__" in n for n in by_name)


def test_rootfs_tarball_keeps_owners_and_mtimes(tmp_path):
    # A rootfs needs its numeric owners (setgid tools) and its mtimes (Debian's pyc files check them).
    src = tmp_path / "rootfs.tar"
    with tarfile.open(src, "w") as tf:
        d = tarfile.TarInfo("./usr/bin")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1234
        tf.addfile(d)
        f = tarfile.TarInfo("./usr/bin/chage")
        f.mode, f.uid, f.gid, f.uname, f.gname, f.mtime, f.size = 0o2755, 0, 42, "root", "shadow", 5678, 3
        tf.addfile(f, io.BytesIO(b"elf"))
        h = tarfile.TarInfo("./usr/bin/chage2")
        h.type, h.linkname, h.gid, h.mtime = tarfile.LNKTYPE, "./usr/bin/chage", 42, 5678
        tf.addfile(h)
    with oci.LayerWriter(tmp_path / "l.tar.gz") as lw:
        lw.add_tarball(src)
        layer = lw.close()
    with tarfile.open(layer.path) as lt:
        e = {m.name: m for m in lt}
    assert e["usr/bin/chage"].gid == 42 and e["usr/bin/chage"].mode == 0o2755 and e["usr/bin/chage"].mtime == 5678
    assert e["usr/bin/chage"].gname == ""
    assert e["usr/bin/chage2"].islnk() and e["usr/bin/chage2"].linkname == "usr/bin/chage"
    assert layer.diff_id == sha(gzip.decompress(layer.path.read_bytes()))


def test_bad_blobs_finds_a_corrupted_blob(tmp_path):
    out, man_digest = build(tmp_path, make_tree(tmp_path / "src", 1), ["x/y:z"])
    assert oci.bad_blobs(out) == []
    data = bytearray(out.read_bytes())
    at = data.index(b'"schemaVersion"', data.index(b"blobs/sha256/" + man_digest.split(":")[1].encode()))
    data[at + 1] = ord("S")  # one byte of the manifest blob
    out.write_bytes(bytes(data))
    assert oci.bad_blobs(out) == ["blobs/sha256/" + man_digest.split(":")[1]]


# --- stage 3: the same input gives the same bytes, a different input different digests ------


def test_output_is_deterministic(tmp_path):
    # Same content, different file mtimes and build directories: byte-identical tarballs.
    outs = {}
    for name, mtime, text in [("a", 1, None), ("b", 2_000_000_000, None), ("c", 1, "print('changed')\n")]:
        (tmp_path / name).mkdir()
        src = make_tree(tmp_path / f"src-{name}", mtime)
        if text:
            (src / "lib" / "mod.py").write_text(text)
        outs[name] = build(tmp_path / name, src, ["x/y:z"])
    assert outs["a"][1] == outs["b"][1]
    assert outs["a"][0].read_bytes() == outs["b"][0].read_bytes()
    assert outs["c"][1] != outs["a"][1]


# --- stage 4: the image cache (images.py) reuses, and rebuilds when an input changes ---------


def test_pause_image_is_cached_by_its_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("TPENV_CACHE", str(tmp_path / "cache"))
    logs: list[str] = []
    first = images.build_pause(logs.append)
    assert first.parent == tmp_path / "cache" / "images"
    assert len(logs) == 1 and "built registry.k8s.io/pause:3.10" in logs[0]
    assert images.image_names(first).keys() == {"registry.k8s.io/pause:3.10"}

    # Warm: the same file, nothing built.
    assert images.build_pause(logs.append) == first and len(logs) == 1

    # The pause binary runs as the image's entrypoint: it is static (no loader in the image).
    layout = oci.read_layout(first)
    (cfg,) = layout["configs"].values()
    assert cfg["config"]["Entrypoint"] == ["/pause"] and cfg["config"]["User"] == "65535:65535"


def test_concurrent_builders_agree(tmp_path):
    # A `cluster up` and a test calling build_pause at once: one builds, the other waits
    # and reuses, and the tarball is sound (the lock and private temp names at work).
    env = {**os.environ, "TPENV_CACHE": str(tmp_path / "cache")}
    code = f"import sys; sys.path.insert(0, {str(Path(images.__file__).parent)!r}); import images; print(images.build_pause(lambda m: None))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    (path,) = outs
    assert oci.bad_blobs(Path(path)) == []
    assert [p.name for p in (tmp_path / "cache" / "images").glob("*.tmp")] == []


def test_agent_version_tracks_the_agent_sources(tmp_path, monkeypatch):
    pkg = tmp_path / "tpenv_agent"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "x.py").write_text("X = 1\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "tpenv"\nversion = "0.1.0"\n')
    monkeypatch.setattr(images, "AGENT_PKG", pkg)
    monkeypatch.setattr(images, "REPO", tmp_path)

    v1 = images.agent_version()
    assert v1.startswith("0.1.0-") and len(v1) == len("0.1.0-") + 12
    assert images.agent_image_ref() == f"tpenv/agent:{v1}"
    (pkg / "sub" / "__pycache__").mkdir()
    (pkg / "sub" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    assert images.agent_version() == v1  # bytecode caches are not sources
    (pkg / "sub" / "x.py").write_text("X = 2\n")
    assert images.agent_version() != v1


def test_apt_mirror_from_deb822_and_one_line_sources(tmp_path):
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
    )
    assert images.apt_mirror([deb822]) == "http://mirror.example/debian"
    one_line = tmp_path / "sources.list"
    one_line.write_text("# deb http://old.example/debian bookworm main\n"
                        "deb [signed-by=/k.gpg] http://cloud.example/apt cloud-sdk-bookworm main\n"
                        "deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert images.apt_mirror([one_line]) == "http://other.example/debian"
    assert images.apt_mirror([tmp_path / "missing.list"]) == "http://deb.debian.org/debian"
