#!/usr/bin/env python3
"""Workspace task runner for tpenv. Standard library only: it runs before anything is installed.

    python3 devspace.py setup            create .venv/ and install tpenv with its test and bench extras
    python3 devspace.py test [ARGS]      setup, bring the local cluster up (unless KUBECONFIG names another
                                         cluster), run the suite
    python3 devspace.py demo [--once]    the main job on the local cluster (examples/hello)
    python3 devspace.py cluster up|down|env|status
    python3 devspace.py images           build and import the cluster's images
    python3 devspace.py bench [--quick]  benchmarks against the local cluster (data path: issues 4, 7)
    python3 devspace.py bench up [--runs N]   `tpenv up` latencies (issue 6): up -> first answer, pod
                                         Ready -> serving, file save -> new handler answering

Build outputs (Go builds, rootfs, images) are cached in ~/.cache/tpenv (override: TPENV_CACHE).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
VENV_PY = VENV / "bin" / "python"
SETUP_STAMP = VENV / ".tpenv-setup"


def say(msg: str) -> None:
    print(f"devspace: {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def _setup_key() -> str:
    # Re-install when the declared dependencies change, not on every run.
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def setup(_argv: list[str] | None = None) -> int:
    key = _setup_key()
    if VENV_PY.exists() and SETUP_STAMP.exists() and SETUP_STAMP.read_text() == key:
        return 0
    if not VENV_PY.exists():
        say(f"creating {VENV.relative_to(ROOT)}/")
        run([sys.executable, "-m", "venv", str(VENV)])
    say("installing tpenv with its test and bench extras (pip)")
    run([str(VENV_PY), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    run([str(VENV_PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[test,bench]"])
    SETUP_STAMP.write_text(key)
    return 0


def _cluster_module():
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    import cli as cluster_cli  # tests/cluster/cli.py, stdlib only

    return cluster_cli


def cluster(argv: list[str]) -> int:
    return _cluster_module().main(argv)


def images(argv: list[str]) -> int:
    return _cluster_module().main(["images", *argv])


def _cluster_env() -> dict[str, str]:
    """The environment for tools that talk to the cluster: KUBECONFIG as given, else the local
    cluster. A KUBECONFIG naming the local cluster's own file (what `cluster up` says to export)
    is the local cluster too: it is brought up, as after a reboot or a `cluster down`."""
    env = dict(os.environ)
    mod = _cluster_module()
    local = Path(mod.kubeconfig_path())
    given = [Path(p) for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    if given and [p.resolve() for p in given] != [local.resolve()]:
        if not any(p.is_file() for p in given):
            raise SystemExit(f"devspace: KUBECONFIG={env['KUBECONFIG']} names no file that exists. Unset it to "
                             f"use the local cluster (built and started here), or point it at your cluster's "
                             f"kubeconfig.")
        return env
    rc = mod.main(["up"])
    if rc != 0:
        raise SystemExit(f"devspace: the local cluster did not come up (exit {rc}); see the lines above")
    env["KUBECONFIG"] = str(local)
    return env


# Debian packages the test suite itself needs on this machine, whatever cluster it runs against:
# sshfs and fuse3 for the mount tests, openssh-sftp-server for the local sshfs tests (a real SFTP
# server behind a real FUSE mount, no cluster), nftables (libnftables) for tpenv connect's captures,
# bash/zsh/fish for the completion tests, podman and busybox-static for --docker-run's engine and image,
# iptables and iproute2 for the in-pod redirect test (netns) (the cluster's own packages are
# tests/cluster/packages.py).
TEST_PACKAGES = ["sshfs", "fuse3", "openssh-sftp-server", "nftables", "bash", "zsh", "fish", "podman",
                 "busybox-static", "iptables", "iproute2",
                 # examples/wordpress/run-local.sh serves the laptop's WordPress with Debian's PHP
                 "php-cli", "php-mysql",
                 # tests/e2e/test_webhook_gitops.py keeps the team's manifests in a git repo and asks `git diff`
                 "git"]


def _ensure_packages(packages: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    import packages as debs  # tests/cluster/packages.py, stdlib only

    debs.ensure(packages)


def test(argv: list[str]) -> int:
    setup()
    _ensure_packages(TEST_PACKAGES)
    env = _cluster_env()
    env.setdefault("TPENV_E2E", "1")
    cmd = [str(VENV_PY), "-m", "pytest", "-ra", *argv]
    say("running: " + " ".join(cmd[2:]))
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc == 5:
        say("pytest collected no tests: that is a failure here")
        return 1
    return rc


def _venv_script(name: str, argv: list[str]) -> int:
    setup()
    env = _cluster_env()
    proc = subprocess.Popen([str(VENV_PY), str(ROOT / name), *argv], cwd=ROOT, env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            # A terminal's Ctrl-C reaches the script too (same process group): it decides how to
            # end (the demo stops tpenv up cleanly). subprocess.run would SIGKILL it here instead.
            continue


def demo(argv: list[str]) -> int:
    return _venv_script("examples/demo.py", argv)


def bench(argv: list[str]) -> int:
    if argv[:1] == ["up"]:
        return _venv_script("bench/up_latency.py", argv[1:])
    return _venv_script("bench/run.py", argv)


COMMANDS = {"setup": setup, "test": test, "demo": demo, "cluster": cluster, "images": images, "bench": bench}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help", "help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:]) or 0
    except subprocess.CalledProcessError as e:
        say(f"command failed (exit {e.returncode}): {' '.join(map(str, e.cmd))}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
