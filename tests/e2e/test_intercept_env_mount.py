"""Seeds 002 and 004: the app's env and volumes on the laptop.

An app whose pod has env from a ConfigMap and a Secret (valueFrom and envFrom), a fieldRef, an
emptyDir with a file the app writes in the cluster, and a projected token file at the path an
env variable names (the IRSA case). `tpenv intercept ... -- CMD` runs a local check with the env.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from test_intercept_kit import Intercepting, client_pod, curl, tpenv, wait_for
from tests.e2e.helpers_up import free_port
from tests.cluster.pytest_plugin import apply, kubectl, live_pods
from tests.kit.apps import testapp_image
from tpenv.settings import MountSettings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TOKEN_DIR = "/var/run/secrets/eks.amazonaws.com/serviceaccount"

CHECK = textwrap.dedent("""\
    import json, os, sys
    root = os.environ["TELEPRESENCE_ROOT"]
    out = {"env": dict(os.environ)}
    out["cluster_file"] = open(os.path.join(root, "data/cluster.txt")).read()
    with open(os.path.join(root, "data/laptop.txt"), "w") as f:
        f.write("written on the laptop\\n")
    out["token"] = open(os.environ["AWS_WEB_IDENTITY_TOKEN_FILE"]).read()
    dev = os.stat(root).st_dev  # the mount's device, whose kernel read-ahead tpenv raised as root
    out["read_ahead_kb"] = int(open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read())
    json.dump(out, open(sys.argv[1], "w"))
""")


def store_app(ns: str) -> None:
    apply([
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "store-config"},
         "data": {"LOG_LEVEL": "info", "FEATURE_X": "on"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "store-secret"},
         "stringData": {"password": "s3cr3t value"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "store"},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "store"}},
                  "template": {"metadata": {"labels": {"app": "store"}}, "spec": {
                      "containers": [{
                          "name": "app", "image": testapp_image(), "imagePullPolicy": "Never",
                          "command": ["sh", "-c", "echo written in the cluster > /data/cluster.txt; exec tpenv-echo"],
                          "ports": [{"containerPort": 8080, "name": "http"}],
                          "env": [{"name": "GREETING", "value": "hello"},
                                  {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "store-secret",
                                                                                         "key": "password"}}},
                                  {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "store-config",
                                                                                      "key": "LOG_LEVEL"}}},
                                  {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                  {"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"}],
                          "envFrom": [{"configMapRef": {"name": "store-config"}, "prefix": "CFG_"}],
                          "volumeMounts": [{"name": "data", "mountPath": "/data"},
                                           {"name": "aws-token", "mountPath": TOKEN_DIR, "readOnly": True}],
                          "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}],
                      "volumes": [{"name": "data", "emptyDir": {}},
                                  {"name": "aws-token", "projected": {"sources": [{"serviceAccountToken": {
                                      "audience": "sts.amazonaws.com", "expirationSeconds": 3600,
                                      "path": "token"}}]}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "store"},
         "spec": {"selector": {"app": "store"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}},
    ], ns=ns)
    kubectl("rollout", "status", "deployment/store", "--timeout=120s", ns=ns, timeout=150)


def test_env_file_mount_and_token_rewrite(namespace, tmp_path):
    ns = namespace
    store_app(ns)
    check = tmp_path / "check.py"
    check.write_text(CHECK)
    result = tmp_path / "result.json"
    vol = tmp_path / "store.vol"

    # Stage 1: intercept with an env file, a mount, the token variable rewritten; run the check.
    cp = tpenv(tmp_path, "intercept", "store", "--port", "18181:web", "-n", ns, "--env-file", "store.env",
               "--env-syntax", "json", "--mount", str(vol), "--rewrite-env", "AWS_WEB_IDENTITY_TOKEN_FILE",
               "--", sys.executable, str(check), str(result), timeout=400)
    assert cp.returncode == 0, cp.stderr
    out = json.loads(result.read_text())
    env_file = json.loads((tmp_path / "store.env").read_text())

    # Stage 2: the env file is what the app process sees (its image's ENV, and PWD its `sh -c`
    # exported, included), plus TELEPRESENCE_*.
    # The leave restored the Deployment, so a rollout may be under way: read a pod it keeps (Running, not
    # being deleted), never one it has finished with.
    kubectl("rollout", "status", "deployment/store", "--timeout=120s", ns=ns, timeout=150)
    pod = next(p["metadata"]["name"] for p in live_pods(ns, "app=store") if p["status"].get("phase") == "Running")
    seen = dict(item.split("=", 1) for item in kubectl("exec", pod, "-c", "app", "--", "cat", "/proc/1/environ",
                                                       ns=ns).stdout.split("\0") if "=" in item)
    expected = dict(seen)
    expected["AWS_WEB_IDENTITY_TOKEN_FILE"] = f"{vol}{TOKEN_DIR}/token"
    got = {k: v for k, v in env_file.items() if not k.startswith("TELEPRESENCE_")}
    assert got == expected
    assert got["PYTHONUNBUFFERED"] == "1" and got["LANG"] == "C.UTF-8"  # the testapp image's ENV
    assert env_file["TELEPRESENCE_ROOT"] == str(vol)
    assert env_file["TELEPRESENCE_CONTAINER"] == "app"
    assert set(env_file["TELEPRESENCE_MOUNTS"].split(":")) >= {"/data", TOKEN_DIR}
    assert env_file["TELEPRESENCE_INTERCEPT_ID"].endswith(":store")
    assert env_file["DB_PASSWORD"] == "s3cr3t value" and env_file["POD_NAME"] == pod
    assert env_file["CFG_FEATURE_X"] == "on" and env_file["LEVEL"] == "info"

    # Stage 3: the command got the same env; it read the cluster's file and the token, and wrote back.
    assert out["env"]["DB_PASSWORD"] == "s3cr3t value"
    assert out["env"]["TELEPRESENCE_ROOT"] == str(vol)
    assert out["cluster_file"] == "written in the cluster\n"
    assert out["token"].count(".") == 2  # a JWT
    assert kubectl("exec", pod, "-c", "app", "--", "cat", "/data/laptop.txt", ns=ns).stdout == "written on the laptop\n"
    # The mount streams with the kernel's read-ahead raised (tests run as root, who may; 128 KiB is
    # the kernel's own default): docs/performance.md, the SFTP mount rows.
    assert os.geteuid() != 0 or out["read_ahead_kb"] == MountSettings().read_ahead_kb > 128, out["read_ahead_kb"]
    # Its SFTP rode a port-forward stream of its own, not the SSH connection (the agent offers it).
    assert "mount SFTP on a port-forward stream of its own" in cp.stderr, cp.stderr

    # Stage 4: the intercept ended with the command: unmounted, the directory left empty.
    assert not vol.exists() or not any(vol.iterdir())

    # Stage 5: `tpenv env NAME` (from a config naming the intercept) prints the same app env.
    tpenv(tmp_path, "-f", "store.yaml", "init", "store", "-n", ns)
    printed = json.loads(tpenv(tmp_path, "-f", "store.yaml", "-o", "json", "env", "store").stdout)
    assert {k: v for k, v in printed.items() if not k.startswith("TELEPRESENCE_")} == \
        {**{k: v for k, v in env_file.items() if not k.startswith("TELEPRESENCE_")},
         "AWS_WEB_IDENTITY_TOKEN_FILE": f"{TOKEN_DIR}/token"}
    assert printed["TELEPRESENCE_CONTAINER"] == "app"


IMAGE = "localhost/tpenv-busybox:dev"


@pytest.fixture(scope="module")
def container_engine(tmp_path_factory) -> dict[str, str]:
    """Debian's podman (installed by devspace test), a tiny image made here with `podman import` of a
    busybox-static rootfs (no registry is reachable), and the environment to run it with."""
    podman, busybox = shutil.which("podman"), shutil.which("busybox")
    if not podman or not busybox:
        pytest.fail("--docker-run's test needs podman and busybox-static: apt-get install podman busybox-static "
                    "(python3 devspace.py test installs them)", pytrace=False)
    tmp = tmp_path_factory.mktemp("engine")
    # This sandbox refuses raising RLIMIT_NOFILE/NPROC, which podman's defaults ask for: pin them.
    conf = tmp / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n')
    env = {"CONTAINERS_CONF": str(conf)}
    if subprocess.run([podman, "image", "exists", IMAGE], env={**os.environ, **env}).returncode != 0:
        root = tmp / "rootfs"
        (root / "bin").mkdir(parents=True)
        shutil.copy(busybox, root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")
        (root / "tmp").mkdir()
        tar = tmp / "rootfs.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
        subprocess.run([podman, "import", str(tar), IMAGE], check=True, capture_output=True, env={**os.environ, **env})
    return env


SERVE = ('mkdir -p /tmp/www && { echo "password=$DB_PASSWORD"; cat /data/cluster.txt; } > /tmp/www/index.html '
         '&& exec busybox httpd -f -p {port} -h /tmp/www')


def test_docker_run_serves_the_intercept_from_a_real_container(namespace, tmp_path, container_engine):
    """--docker-run with a real engine: the container gets the env file, the volumes and the port,
    and answers the cluster's requests."""
    ns = namespace
    store_app(ns)
    client_pod(ns)
    vol = tmp_path / "vol"
    port = free_port()
    # Stage 1: the intercept runs the image; the container serves what it was given.
    run = Intercepting(tmp_path, "store", "--port", f"{port}:web", "-n", ns, "--mount", str(vol),
                       "--docker-run", "--", IMAGE, "/bin/busybox", "sh", "-c", SERVE.replace("{port}", str(port)),
                       env=container_engine)
    try:
        run.ready()
        body = wait_for("the container's answer through the Service",
                        lambda: (lambda b: b if b.startswith("password=") else None)(curl(ns, f"http://store.{ns}/")),
                        120)
        assert body.splitlines() == ["password=s3cr3t value", "written in the cluster"]
    finally:
        # Stage 2: Ctrl-C ends the container with the intercept (its exit status is the container's:
        # busybox httpd as PID 1 ends on the engine's stop); nothing of it is left running.
        code = run.stop()
        assert code not in (125, 126, 127), "".join(run.stderr)  # the engine itself failed
    left = subprocess.run(["podman", "ps", "-q", "--filter", f"ancestor={IMAGE}"], capture_output=True, text=True,
                          env={**os.environ, **container_engine})
    assert left.stdout.strip() == ""


def path_without(bindir, *names: str) -> str:
    """A PATH holding every program of this one except ``names``: links in ``bindir``. The real
    lookup then misses them, and nothing is uninstalled (other tests need sshfs)."""
    bindir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for entry in os.scandir(d):
            link = bindir / entry.name
            if entry.name not in names and not os.path.lexists(link):
                link.symlink_to(entry.path)
    return str(bindir)


ENV_ONLY = textwrap.dedent("""\
    import json, os, sys
    json.dump(dict(os.environ), open(sys.argv[1], "w"))
""")


def test_default_mount_is_skipped_without_sshfs_and_an_explicit_one_fails(namespace, tmp_path):
    """Issue #14: on a machine without sshfs, the default intercept runs without the mount and says
    once what it skipped and how to get it; `--mount DIR` asked for a mount, and fails clearly."""
    ns = namespace
    store_app(ns)
    no_sshfs = {"PATH": path_without(tmp_path / "bin", "sshfs")}
    check = tmp_path / "check.py"
    check.write_text(ENV_ONLY)
    result = tmp_path / "result.json"

    # Stage 1: no --mount: the command runs with the app's env; the volumes are left out, said once.
    cp = tpenv(tmp_path, "intercept", "store", "--port", "18383:web", "-n", ns, "--",
               sys.executable, str(check), str(result), env=no_sshfs, timeout=400, check=False)
    assert cp.returncode == 0, cp.stderr
    env = json.loads(result.read_text())
    assert env["DB_PASSWORD"] == "s3cr3t value" and set(env["TELEPRESENCE_MOUNTS"].split(":")) >= {"/data"}
    assert cp.stderr.count("are not mounted: sshfs is not installed") == 1, cp.stderr
    assert "apt-get install sshfs" in cp.stderr and "--mount-mode sync" in cp.stderr
    assert "(none)" in cp.stdout  # the intercept's block: Volume Mount Point (none)

    # Stage 2: --mount DIR with the same PATH: the clear MissingTool error, and a non-zero exit.
    vol = tmp_path / "vol"
    cp = tpenv(tmp_path, "intercept", "store", "--port", "18384:web", "-n", ns, "--mount", str(vol), "--",
               sys.executable, str(check), str(result), env=no_sshfs, timeout=400, check=False)
    assert cp.returncode != 0
    assert "sshfs is not installed" in cp.stderr and "apt-get install sshfs" in cp.stderr, cp.stderr
    assert "are not mounted" not in cp.stderr  # no note: an error
    assert not vol.exists() or not any(vol.iterdir())
