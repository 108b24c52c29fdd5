"""The manager as a real process: HTTPS with a freshly generated certificate, real sockets.

Stages: start (port 0, bound port reported), health, AdmissionReview over keep-alive, errors,
clean stop on SIGTERM, refusal to start without a certificate.
"""
from __future__ import annotations

import base64
import datetime as dt
import http.client
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

AGENT_ROOT = Path(__file__).resolve().parents[1]


def _cert(tmp: Path) -> Path:
    """A CA and a serving certificate for 127.0.0.1, as the install makes for the Service name."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "manager")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    tls = tmp / "tls"
    tls.mkdir()
    (tls / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tls / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    (tmp / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return tls


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(AGENT_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tpenv_agent.manager", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def manager(tmp_path):
    tls = _cert(tmp_path)
    port_file = tmp_path / "port"
    proc = _start(["--tls-dir", str(tls), "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                   "--agent-image", "tpenv/agent:e2e", "--agent-pull-policy", "Never", "--idle-timeout", "1"])
    deadline = time.monotonic() + 20
    while not (port_file.exists() and port_file.read_text().strip()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "manager did not report its port"
        time.sleep(0.05)
    port = int(port_file.read_text())
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    yield proc, port, ctx
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _review(labels_ports=True):
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "web-", "labels": {"tpenv.io/inject-agent": "enabled"}},
           "spec": {"containers": [{"name": "web", "image": "nginx",
                                    "ports": [{"name": "http", "containerPort": 8080}] if labels_ports else []}]}}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "abc", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": "CREATE", "namespace": "shop", "object": pod}}


# --- stage 1: it starts on a kernel-chosen port and reports it -------------------------------

def test_reports_bound_port_on_stdout_too(manager):
    proc, port, _ = manager
    assert proc.stdout.readline().strip() == f"listening on https://127.0.0.1:{port}"


def test_healthz_over_verified_tls(manager):
    _, port, ctx = manager
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"ok\n"


# --- stage 2: AdmissionReview, several on one keep-alive connection ---------------------------

def test_mutate_answers_with_a_jsonpatch(manager):
    _, port, ctx = manager
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    for review, patched in ((_review(), True), (_review(labels_ports=False), False)):
        # The API server appends ?timeout=...; the path must still match.
        conn.request("POST", "/mutate?timeout=5s", body=json.dumps(review),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        answer = json.loads(resp.read())["response"]
        assert answer["uid"] == "abc" and answer["allowed"] is True
        if patched:
            ops = json.loads(base64.b64decode(answer["patch"]))
            added = [op for op in ops if op["path"] == "/spec/containers"][0]["value"]
            agent = added[-1]
            assert agent["name"] == "tpenv-agent" and agent["image"] == "tpenv/agent:e2e"
            assert agent["imagePullPolicy"] == "Never" and "7900:8080:http" in agent["args"]
        else:
            # Refused: a warning, and a patch that only notes why on the pod (no agent).
            ops = json.loads(base64.b64decode(answer["patch"]))
            assert answer["warnings"] and [op["path"] for op in ops] == ["/metadata/annotations"]


def test_bad_requests_get_http_errors(manager):
    _, port, ctx = manager
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    conn.request("POST", "/mutate", body=b"{not json")
    assert conn.getresponse().status == 400
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    conn.request("GET", "/elsewhere")
    assert conn.getresponse().status == 404


def test_idle_connections_are_closed(manager):
    _, port, ctx = manager
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            started = time.monotonic()
            assert tls.recv(1) == b""  # the server closed it, without a request
            assert 0.5 < time.monotonic() - started < 8


# --- stage 3: lifecycle -------------------------------------------------------------------------

def test_sigterm_stops_it_cleanly(manager):
    proc, _, _ = manager
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_refuses_to_start_without_a_certificate(tmp_path):
    proc = _start(["--tls-dir", str(tmp_path / "missing"), "--listen", "127.0.0.1:0"])
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "tls.crt" in err
