"""Build the cluster's Go binaries from the Go module proxy, cached outside the repo.

Three wrapper modules, each a go.mod + a tiny main, built with `go build` into
$TPENV_CACHE/bin/<name>-<version>/:

- Kubernetes: requires k8s.io/kubernetes and `replace`s every staging module
  (k8s.io/api => k8s.io/api v0.x.y, ...): the tag's go.mod points them at
  ./staging/..., which a module download does not have. The list is generated
  from the tag's go.mod, the output is committed in gomod/k8s/.
- etcd: requires go.etcd.io/etcd/server/v3; main calls etcdmain.Main(os.Args).
- CoreDNS: requires github.com/coredns/coredns with only the plugins we use
  (no `forward`: cluster names never leave the machine).

A build is skipped when its binaries exist. The flags are kept identical from run
to run so the Go build cache (GOCACHE) is hit after a `rm -rf bin/`.
Standard library only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import zipfile
from pathlib import Path

K8S_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.4"  # the one already in the k8s module graph, so the module cache has it
COREDNS_VERSION = "v1.13.2"  # requires client-go v0.34.x, like our k8s
LOCAL_PATH_VERSION = "v0.0.30"  # rancher's local-path-provisioner: the default StorageClass (issue 16)
HELM_VERSION = "v3.19.5"  # the last helm on client-go v0.34.x, like our k8s: most modules are cached already
GO_FALLBACK = "go1.25.4"  # fetched from the module proxy when no `go` is installed

K8S_BINARIES = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl"]
HERE = Path(__file__).resolve().parent
GOMOD_DIR = HERE / "gomod"

COREDNS_PLUGINS = ["bind", "cache", "errors", "health", "kubernetes", "loadbalance", "log", "ready", "reload"]


def cache_root() -> Path:
    return Path(os.environ.get("TPENV_CACHE") or Path.home() / ".cache" / "tpenv")


def k8s_bin_dir() -> Path:
    return cache_root() / "bin" / f"k8s-{K8S_VERSION}"


def etcd_bin() -> Path:
    return cache_root() / "bin" / f"etcd-{ETCD_VERSION}" / "etcd"


def coredns_bin() -> Path:
    return cache_root() / "bin" / f"coredns-{COREDNS_VERSION}" / "coredns"


def kubectl_bin() -> Path:
    return k8s_bin_dir() / "kubectl"


def local_path_bin() -> Path:
    return cache_root() / "bin" / f"local-path-provisioner-{LOCAL_PATH_VERSION}" / "local-path-provisioner"


def helm_bin() -> Path:
    return cache_root() / "bin" / f"helm-{HELM_VERSION}" / "helm"


# ---------------------------------------------------------------- the Go toolchain

def go_binary(log=print) -> str:
    """`go` from PATH (or /usr/local/go), else a toolchain from the module proxy, cached."""
    found = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if found:
        return found
    root = cache_root() / "toolchain" / GO_FALLBACK
    go = root / "go" / "bin" / "go"
    if go.exists():
        return str(go)
    # golang.org/toolchain is an ordinary module on the proxy: a zip of the Go distribution.
    url = f"https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-{GO_FALLBACK}.linux-amd64.zip"
    log(f"cluster: no `go` found; fetching {GO_FALLBACK} from the Go module proxy")
    root.mkdir(parents=True, exist_ok=True)
    zpath = root / "toolchain.zip"
    with urllib.request.urlopen(url, timeout=600) as r, open(zpath, "wb") as f:
        shutil.copyfileobj(r, f)
    with zipfile.ZipFile(zpath) as z:
        for info in z.infolist():
            # Entries are "golang.org/toolchain@v0.0.1-go1.x.linux-amd64/bin/go": strip the prefix.
            rel = info.filename.split("/", 2)[-1] if info.filename.count("/") >= 2 else None
            if not rel or info.is_dir():
                continue
            dest = root / "go" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                dest.chmod(mode)
    zpath.unlink()
    return str(go)


def go_env() -> dict[str, str]:
    c = cache_root()
    env = dict(os.environ)
    env.update(GOMODCACHE=str(c / "gomod"), GOCACHE=str(c / "gocache"), GOTOOLCHAIN="local", CGO_ENABLED="0")
    return env


def _go(args: list[str], cwd: Path, log=print) -> None:
    subprocess.run([go_binary(log), *args], cwd=cwd, env=go_env(), check=True)


# ---------------------------------------------------------------- Kubernetes

def k8s_wrapper_gomod(tag_gomod: str, version: str = K8S_VERSION) -> str:
    """The wrapper go.mod: the tag's `k8s.io/x => ./staging/...` replaces pinned to v0.<minor>.<patch>."""
    staging_version = "v0." + version[len("v1."):]
    names = sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", tag_gomod, re.M)))
    go_line = re.search(r"^go (\S+)", tag_gomod, re.M).group(1)
    lines = [
        "// Wrapper module: builds upstream Kubernetes binaries from the Go module proxy.",
        f"// Generated by tests/cluster/build.py from k8s.io/kubernetes {version}'s go.mod; do not edit by hand.",
        "module tpenv.local/k8sbuild",
        "",
        f"go {go_line}",
        "",
        f"require k8s.io/kubernetes {version}",
        "",
        "replace (",
        *[f"\t{n} => {n} {staging_version}" for n in names],
        ")",
        "",
    ]
    return "\n".join(lines)


def regenerate_k8s_gomod(log=print) -> Path:
    """Rewrite gomod/k8s/go.mod from the tag's go.mod (a maintainer step when bumping K8S_VERSION)."""
    out = subprocess.run([go_binary(log), "mod", "download", "-json", f"k8s.io/kubernetes@{K8S_VERSION}"],
                         env=go_env(), check=True, capture_output=True, text=True, cwd="/")
    tag_gomod = Path(json.loads(out.stdout)["GoMod"]).read_text()
    dest = GOMOD_DIR / "k8s" / "go.mod"
    dest.write_text(k8s_wrapper_gomod(tag_gomod))
    _go(["mod", "tidy"], GOMOD_DIR / "k8s", log)
    return dest


def _ldflags_k8s() -> str:
    v = K8S_VERSION
    major, minor = v[1:].split(".")[:2]
    return " ".join([
        "-s -w",
        f"-X k8s.io/component-base/version.gitVersion={v}",
        f"-X k8s.io/component-base/version.gitMajor={major}",
        f"-X k8s.io/component-base/version.gitMinor={minor}",
        "-X k8s.io/component-base/version.gitTreeState=clean",
        "-X k8s.io/component-base/version.buildDate=2026-01-01T00:00:00Z",
        f"-X k8s.io/client-go/pkg/version.gitVersion={v}",
        f"-X k8s.io/client-go/pkg/version.gitMajor={major}",
        f"-X k8s.io/client-go/pkg/version.gitMinor={minor}",
    ])


def build_k8s(log=print) -> Path:
    out = k8s_bin_dir()
    if all((out / b).exists() for b in K8S_BINARIES):
        return out
    # Build in a copy of the wrapper so `go` never writes into the checkout.
    work = cache_root() / "k8s-build"
    work.mkdir(parents=True, exist_ok=True)
    for f in ("go.mod", "go.sum", "tools.go"):
        shutil.copy(GOMOD_DIR / "k8s" / f, work / f)
    log(f"cluster: building Kubernetes {K8S_VERSION} ({', '.join(K8S_BINARIES)}) with go build "
        "(cold: ~6 min on 2 cores, plus module downloads)")
    t = time.monotonic()
    pkgs = [f"k8s.io/kubernetes/cmd/{b}" for b in K8S_BINARIES]
    _go(["build", "-trimpath", "-ldflags", _ldflags_k8s(), "-o", str(out) + "/", *pkgs], work, log)
    log(f"cluster: Kubernetes built in {time.monotonic() - t:.0f}s -> {out}")
    return out


# ---------------------------------------------------------------- etcd and CoreDNS

def _wrapper_build(name: str, module: str, version: str, main_go: str, out: Path, ldflags: str,
                   log=print) -> Path:
    if out.exists():
        return out
    work = cache_root() / f"{name}-build"
    work.mkdir(parents=True, exist_ok=True)
    gomod = f"module tpenv.local/{name}build\n\ngo 1.24.0\n\nrequire {module} {version}\n"
    if not (work / "go.mod").exists() or f"require {module} {version}" not in (work / "go.mod").read_text():
        (work / "go.mod").write_text(gomod)
        (work / "go.sum").unlink(missing_ok=True)
    (work / "main.go").write_text(main_go)
    log(f"cluster: building {name} {version} from the Go module proxy")
    t = time.monotonic()
    # `go mod tidy` resolves the dependency graph exactly as the required module pins it.
    _go(["mod", "tidy"], work, log)
    _go(["build", "-trimpath", "-ldflags", ldflags, "-o", str(out), "."], work, log)
    log(f"cluster: {name} built in {time.monotonic() - t:.0f}s -> {out}")
    return out


ETCD_MAIN = """// Wrapper: the etcd server binary, built from go.etcd.io/etcd/server/v3.
package main

import (
\t"os"

\t"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
"""


def build_etcd(log=print) -> Path:
    return _wrapper_build("etcd", "go.etcd.io/etcd/server/v3", ETCD_VERSION, ETCD_MAIN, etcd_bin(), "-s -w", log)


def _coredns_main() -> str:
    imports = "\n".join(f'\t_ "github.com/coredns/coredns/plugin/{p}"' for p in COREDNS_PLUGINS)
    return ("// Wrapper: CoreDNS with only the plugins the local cluster uses (no forward: no upstream).\n"
            "package main\n\nimport (\n\t\"github.com/coredns/coredns/coremain\"\n" + imports + "\n)\n\n"
            "func main() { coremain.Run() }\n")


def build_coredns(log=print) -> Path:
    return _wrapper_build("coredns", "github.com/coredns/coredns", COREDNS_VERSION, _coredns_main(),
                          coredns_bin(), "-s -w", log)


def _tools_build(name: str, module: str, version: str, pkg: str, out: Path, ldflags: str, log=print) -> Path:
    """Build ``pkg`` of ``module`` at ``version`` from a wrapper whose tools.go pins the main package,
    so that `go mod tidy` keeps exactly the dependencies the module's own go.mod pins."""
    if out.exists():
        return out
    work = cache_root() / f"{name}-build"
    work.mkdir(parents=True, exist_ok=True)
    gomod = f"module tpenv.local/{name.replace('-', '')}build\n\ngo 1.24.0\n\nrequire {module} {version}\n"
    if not (work / "go.mod").exists() or f"require {module} {version}" not in (work / "go.mod").read_text():
        (work / "go.mod").write_text(gomod)
        (work / "go.sum").unlink(missing_ok=True)
    (work / "tools.go").write_text(
        "//go:build tools\n\n// Package tools pins the main package so that `go mod tidy` keeps its dependencies.\n"
        f'package tools\n\nimport _ "{pkg}"\n')
    log(f"cluster: building {name} {version} from the Go module proxy (cold: a few minutes)")
    t = time.monotonic()
    _go(["mod", "tidy"], work, log)
    _go(["build", "-trimpath", "-ldflags", ldflags, "-o", str(out), pkg], work, log)
    log(f"cluster: {name} built in {time.monotonic() - t:.0f}s -> {out}")
    return out


def build_helm(log=print) -> Path:
    """helm, for the manager chart's tests (`helm install` on the local cluster)."""
    return _tools_build("helm", "helm.sh/helm/v3", HELM_VERSION, "helm.sh/helm/v3/cmd/helm", helm_bin(),
                        f"-s -w -X helm.sh/helm/v3/internal/version.version={HELM_VERSION}", log)


def build_local_path(log=print) -> Path:
    """rancher's local-path-provisioner: PVCs get a directory on the node (the cluster's StorageClass).

    Its main package is the module's root; built with its own pins (client-go v0.30).
    """
    module = "github.com/rancher/local-path-provisioner"
    return _tools_build("local-path-provisioner", module, LOCAL_PATH_VERSION, module, local_path_bin(),
                        f"-s -w -X main.VERSION={LOCAL_PATH_VERSION}", log)


def build_all(log=print) -> None:
    build_k8s(log)
    build_etcd(log)
    build_coredns(log)
    build_local_path(log)
    build_helm(log)


if __name__ == "__main__":
    build_all()
