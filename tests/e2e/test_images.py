"""Locally built images against the local cluster's containerd: import, run, serve.

Stages: (1) a tiny image written by oci.py is imported by images.import_all,
runs with `ctr run`, and a second import is skipped; (2) the images of
build_all run their commands under ctr; (3) the test app (tpenv/testapp:<content hash>) runs as a pod
(imagePullPolicy Never) and answers HTTP/1.1, h2c and gRPC on one port.

ctr needs the local containerd socket: against a cluster given by KUBECONFIG
(kind, cloud) the images are not ours to import, so these tests skip there.
"""
from __future__ import annotations

import json
import random
import string
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.cluster.pytest_plugin import apply, kubectl, wait_until

import components  # noqa: E402  tests/cluster, on sys.path through the plugin
import images  # noqa: E402
import oci  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def containerd(kubeconfig: Path) -> str:
    if Path(kubeconfig).resolve() != components.kubeconfig_path().resolve():
        pytest.skip("ctr needs the local cluster's containerd; KUBECONFIG points at another cluster")
    return str(components.containerd_address())


@pytest.fixture(scope="module")
def built(containerd: str) -> list[Path]:
    paths = images.build_all(log=print)
    images.import_all(paths, log=print, address=containerd)
    return paths


def ctr(address: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ctr", "-a", address, "-n", "k8s.io", *args], capture_output=True, text=True, timeout=timeout)


def ctr_run(address: str, image: str, *cmd: str) -> subprocess.CompletedProcess:
    cid = "tpenv-test-" + "".join(random.choices(string.ascii_lowercase, k=8))
    return ctr(address, "run", "--rm", image, cid, *cmd)


# --- stage 1: a tiny image, imported once, runs ------------------------------------------


HELLO_C = '#include <stdio.h>\nint main(void) { puts("hello from a tpenv test image"); return 0; }\n'


def test_tiny_image_imports_once_and_runs(containerd):
    name = "tpenv-test/hello:" + "".join(random.choices(string.ascii_lowercase, k=6))
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "hello.c").write_text(HELLO_C)
        subprocess.run(["gcc", "-static", "-Os", "-o", str(t / "hello"), str(t / "hello.c")], check=True)
        with oci.LayerWriter(t / "layer.tar.gz") as lw:
            lw.add_file("hello", (t / "hello").read_bytes(), 0o755)
            layer = lw.close()
        tarball = t / "hello.oci.tar"
        digest = oci.write_image(tarball, [name], [layer], oci.image_config([layer], entrypoint=["/hello"]))
        try:
            logs: list[str] = []
            images.import_all([tarball], log=logs.append, address=containerd)
            assert len(logs) == 1 and name in logs[0]
            assert images.present_images(containerd)[name] == digest

            # Already there with the same digest: nothing imported.
            images.import_all([tarball], log=logs.append, address=containerd)
            assert len(logs) == 1

            r = ctr_run(containerd, name)
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == "hello from a tpenv test image"
        finally:
            ctr(containerd, "images", "rm", name)


# --- stage 2: the cluster's images are present and their commands run --------------------


def test_build_all_images_are_in_containerd(built, containerd):
    have = images.present_images(containerd)
    for path in built:
        for name, digest in images.image_names(path).items():
            assert have.get(name) == digest, f"{name} not imported (or another digest)"
    agent = have[images.agent_image_ref()]
    for alias in ["tpenv/agent:dev", f"tpenv/agent:{images.project_version()}", "docker.io/tpenv/agent:dev"]:
        assert have.get(alias) == agent, alias
    assert images.PAUSE_REF in have
    # The test app under its content tag (what tests use) and the :dev alias (what examples and
    # unrebased branches name; another checkout's import may have re-pointed it, so no digest check).
    assert images.testapp_image_ref() in have and images.TESTAPP_REF in have


def test_testapp_commands_run(built, containerd):
    r = ctr_run(containerd, images.testapp_image_ref(), "tpenv-echo", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: tpenv-echo" in r.stdout
    r = ctr_run(containerd, images.testapp_image_ref(), "tpenv-get", "--help")
    assert r.returncode == 0 and "--grpc" in r.stdout, r.stderr


def test_agent_image_has_its_packages_and_env_names(built, containerd):
    probe = (
        "import json, asyncssh, cryptography, h2, tpenv_agent.main\n"
        "print(json.dumps(json.load(open('/etc/tpenv/image-env.json'))))\n"
    )
    r = ctr_run(containerd, images.agent_image_ref(), "python3", "-c", probe)
    assert r.returncode == 0, r.stderr
    names = json.loads(r.stdout)
    assert "PATH" in names and all("=" not in n for n in names)
    r = ctr_run(containerd, "tpenv/agent:dev", "sh", "-c", "command -v tpenv-agent")
    assert r.stdout.strip() == "/usr/local/bin/tpenv-agent", r.stderr


# --- stage 3: the test app as a pod answers all three protocols on one port ----------------


def test_testapp_pod_answers_http1_h2c_and_grpc(built, namespace):
    apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "echo"},
            "spec": {
                "containers": [
                    {
                        "name": "echo",
                        "image": images.testapp_image_ref(),
                        "imagePullPolicy": "Never",
                        "ports": [{"containerPort": 8080, "name": "http"}],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1},
                    }
                ]
            },
        },
        ns=namespace,
    )
    kubectl("wait", "--for=condition=Ready", "pod/echo", "--timeout=120s", ns=namespace, timeout=150)

    def get(*args: str) -> list[dict]:
        out = kubectl("exec", "echo", "--", "tpenv-get", "http://127.0.0.1:8080/hi", "-n", "3", "-H", "x-test: yes",
                      *args, ns=namespace).stdout
        return [json.loads(line) for line in out.splitlines()]

    for flag, proto in [(None, "HTTP/1.1"), ("--http2", "HTTP/2"), ("--grpc", "gRPC")]:
        answers = get(*([flag] if flag else []))
        assert len(answers) == 3, answers
        for a in answers:
            assert a["pod"] == "echo" and a["proto"] == proto and a["source"] == "cluster"
            assert a["headers"]["x-test"] == "yes"

    # Every request is logged, so `kubectl logs` shows the app at work.
    wait_until("9 request lines in the pod's log",
               lambda: kubectl("logs", "echo", ns=namespace).stdout.count("GET /hi") + 
               kubectl("logs", "echo", ns=namespace).stdout.count("POST /hi") >= 9, 20)
