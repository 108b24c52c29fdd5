"""Seeds 002 and 004: the app's env and volumes on the laptop.

An app whose pod has env from a ConfigMap and a Secret (valueFrom and envFrom), a fieldRef, an
emptyDir with a file the app writes in the cluster, and a projected token file at the path an
env variable names (the IRSA case). `tpenv intercept ... -- CMD` runs a local check with the env.
"""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

from test_intercept_kit import tpenv
from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json

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
                          "name": "app", "image": "tpenv/testapp:dev", "imagePullPolicy": "Never",
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

    # Stage 2: the env file is what the app container sees, plus TELEPRESENCE_*.
    pod = kubectl_json("get", "pods", "-l", "app=store", ns=ns)["items"][0]["metadata"]["name"]
    seen = dict(line.split("=", 1) for line in kubectl("exec", pod, "-c", "app", "--", "env", ns=ns)
                .stdout.splitlines() if "=" in line)
    image_env = {"PATH", "HOME", "LANG", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
    expected = {k: v for k, v in seen.items() if k not in image_env}
    expected["AWS_WEB_IDENTITY_TOKEN_FILE"] = f"{vol}{TOKEN_DIR}/token"
    got = {k: v for k, v in env_file.items() if not k.startswith("TELEPRESENCE_") and k not in image_env}
    assert got == expected
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

    # Stage 4: the intercept ended with the command: unmounted, the directory left empty.
    assert not vol.exists() or not any(vol.iterdir())

    # Stage 5: `tpenv env NAME` (from a config naming the intercept) prints the same app env.
    tpenv(tmp_path, "-f", "store.yaml", "init", "store", "-n", ns)
    printed = json.loads(tpenv(tmp_path, "-f", "store.yaml", "-o", "json", "env", "store").stdout)
    assert {k: v for k, v in printed.items() if not k.startswith("TELEPRESENCE_")} == \
        {**{k: v for k, v in env_file.items() if not k.startswith("TELEPRESENCE_")},
         "AWS_WEB_IDENTITY_TOKEN_FILE": f"{TOKEN_DIR}/token"}
    assert printed["TELEPRESENCE_CONTAINER"] == "app"


def test_docker_run_gets_env_file_mounts_and_port(namespace, tmp_path):
    """--docker-run: the `docker run` line tpenv builds. There is no Docker engine here, so a
    stand-in `docker` program first on PATH records its arguments and the env file it was given."""
    ns = namespace
    store_app(ns)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "docker-call.json"
    (bindir / "docker").write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        argv = sys.argv[1:]
        env_file = open(argv[argv.index("--env-file") + 1]).read()
        json.dump({{"argv": argv, "env_file": env_file}}, open({str(record)!r}, "w"))
        """))
    (bindir / "docker").chmod(0o755)
    vol = tmp_path / "vol"
    import os

    cp = tpenv(tmp_path, "intercept", "store", "--port", "18282:web", "-n", ns, "--mount", str(vol),
               "--docker-run", "--", "registry.example/store:1", "serve", "--debug",
               env={"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}, timeout=400)
    assert cp.returncode == 0, cp.stderr
    call = json.loads(record.read_text())
    argv = call["argv"]
    assert argv[:2] == ["run", "--rm"] and argv[-3:] == ["registry.example/store:1", "serve", "--debug"]
    assert ["-p", "18282:18282"] == argv[argv.index("-p"):argv.index("-p") + 2]
    assert f"{vol}/data:/data" in argv and f"{vol}{TOKEN_DIR}:{TOKEN_DIR}" in argv
    assert "DB_PASSWORD=s3cr3t value" in call["env_file"].splitlines()
