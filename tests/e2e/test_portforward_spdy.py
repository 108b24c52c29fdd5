"""The SPDY/3.1 port-forward against the real API server and kubelet, forced and as the fallback.

Forced (``protocol="spdy"`` / ``TPENV_PORTFORWARD_PROTOCOL=spdy``; the 1.34 API server takes
SPDY too): many concurrent streams through one session with MiBs each way checked by hash,
the kubelet's error for a closed port, and the hello intercept (asyncssh over the tunnel)
with spdy forced. Fallback: a TLS-terminating proxy in front of the API server answers every
WebSocket upgrade with 400 and passes the rest through; a kubeconfig pointed at it must
port-forward over SPDY, and say so once.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import logging
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from test_intercept_kit import Intercepting, LocalServer, client_pod, curl, deploy_hello, tpenv, wait_for
from portforward_kit import echo_pod, http_get, kube, roundtrip  # noqa: F401 - fixtures
from tests.tracked_server import TrackedServer
from tpenv.errors import NotFound, TunnelDropped
from tpenv.kits import portforward
from tpenv.kits.kube import Kube
from tpenv.kits.portforward import PodTunnel

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


# -- stage 1: forced SPDY, many streams through one session ---------------------------------------

async def test_many_concurrent_streams_through_one_session(kube, namespace, echo_pod):  # noqa: F811
    tunnel = PodTunnel(kube, namespace, echo_pod, protocol="spdy")
    results = await asyncio.gather(*(roundtrip(tunnel, 3 * 1024 * 1024) for _ in range(6)))
    assert results == [True] * 6
    assert len(tunnel._sessions) == 1, "one SPDY session carries every stream of the tunnel"
    session = next(iter(tunnel._sessions))
    print(f"6 x 3 MiB each way through one session; the kubelet did flow control: {session.peer_flow_control}")

    # HTTP through the same session, concurrently.
    answers = await asyncio.gather(*(http_get(tunnel, f"/n/{i}") for i in range(20)))
    assert sorted(a["path"] for a in answers) == sorted(f"/n/{i}" for i in range(20))
    assert tunnel._sessions == {session}
    tunnel.close()
    await asyncio.wait_for(tunnel.wait_closed(), 30)


async def test_closed_port_reports_the_kubelets_error_and_the_session_lives_on(kube, namespace,  # noqa: F811
                                                                               echo_pod):  # noqa: F811
    tunnel = PodTunnel(kube, namespace, echo_pod, protocol="spdy")
    reader, _writer = await tunnel.open_stream(9999)
    with pytest.raises(TunnelDropped) as err:
        await asyncio.wait_for(reader.read(), 30)
    assert "9999" in str(err.value) and "connection refused" in str(err.value)
    # The failed stream did not take the session with it (kubectl's client would have closed it).
    session = next(iter(tunnel._sessions))
    assert await roundtrip(tunnel, 65536 * 4)
    assert tunnel._sessions == {session} and session.usable
    tunnel.close()
    await asyncio.wait_for(tunnel.wait_closed(), 30)


async def test_missing_pod_is_not_found(kube, namespace):  # noqa: F811
    with pytest.raises(NotFound):
        await PodTunnel(kube, namespace, "no-such-pod", protocol="spdy").open_stream(80)


# -- stage 2: asyncssh over SPDY: the hello intercept with spdy forced ------------------------------

def test_hello_intercept_over_spdy(namespace, tmp_path, monkeypatch):
    ns = namespace
    deploy_hello(ns)
    client_pod(ns)
    wait_for("the cluster's answer", lambda: json.loads(curl(ns, f"http://hello.{ns}/"))["source"] == "cluster")
    monkeypatch.setenv("TPENV_PORTFORWARD_PROTOCOL", "spdy")  # Intercepting passes os.environ on
    local = LocalServer("hello over spdy")
    run = Intercepting(tmp_path, "hello", "--port", str(local.port), "--mount", "false", "-n", ns, "--debug")
    try:
        info = run.ready()
        assert info["state"] == "ACTIVE"
        wait_for("the laptop's answer", lambda: curl(ns, f"http://hello.{ns}/") == "hello over spdy")
        # The agent's SSH ran over SPDY sessions, and never over a WebSocket.
        log = "".join(run.stderr)
        assert "[spdy/" in log and "session open" in log, log[-3000:]
        # (The app's env is read through pods/exec, a WebSocket of its own: only port-forward
        # requests must not have gone over one.)
        ws_requests = [line for line in log.splitlines() if '"> GET ' in line]
        assert not [line for line in ws_requests if "/portforward" in line], ws_requests
        tpenv(tmp_path, "leave", "hello")
        assert run.proc.wait(60) == 0
    finally:
        run.stop()
        local.close()
    tpenv(tmp_path, "uninstall", "--agent", "hello", "-n", ns)


# -- stage 3: the fallback, through a proxy that refuses WebSocket -------------------------------------

def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (the proxy's), with its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tpenv-test-proxy")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "proxy.crt", tmp / "proxy.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class RefusingProxy(TrackedServer):
    """TLS on 127.0.0.1:0; WebSocket upgrades get the old API server's 400, the rest goes to the real one."""

    def __init__(self, upstream: Kube, cert: Path, key: Path) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        super().__init__(ctx)
        self.upstream = upstream
        self.refused = 0
        self.passed: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        if any(line.lower().startswith("upgrade:") and "websocket" in line.lower() for line in lines):
            self.refused += 1
            body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "message": "Upgrade request required", "reason": "BadRequest",
                               "code": 400}).encode()
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
            return
        self.passed.append(lines[0])
        url = urlsplit(self.upstream.host)
        up_r, up_w = await asyncio.open_connection(url.hostname, url.port, ssl=self.upstream.ssl_context(),
                                                   server_hostname=url.hostname)
        self.writers.add(up_w)
        up_w.write(head)  # the proxy authenticates upstream with the kubeconfig's client certificate

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)


def kubeconfig_via(kubeconfig: Path, proxy_port: int, ca: Path, out: Path) -> Path:
    """A copy of the kubeconfig whose cluster is the proxy, trusted through its certificate."""
    cfg = json.loads(Path(kubeconfig).read_text())
    for c in cfg["clusters"]:
        c["cluster"]["server"] = f"https://127.0.0.1:{proxy_port}"
        c["cluster"].pop("certificate-authority", None)
        c["cluster"]["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
    out.write_text(json.dumps(cfg))
    return out


async def test_websocket_refused_by_a_proxy_falls_back_to_spdy(kube, kubeconfig, namespace, echo_pod,  # noqa: F811
                                                               tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tpenv.portforward")
    cert, key = self_signed(tmp_path)
    async with RefusingProxy(kube, cert, key) as proxy:
        proxied = await Kube.load(str(kubeconfig_via(kubeconfig, proxy.port, cert, tmp_path / "kubeconfig")))
        try:
            tunnel = PodTunnel(proxied, namespace, echo_pod, protocol="auto")
            assert await roundtrip(tunnel, 1024 * 1024)
            assert await roundtrip(tunnel, 1024 * 1024)
            # A second tunnel to the same API server goes straight to SPDY.
            other = PodTunnel(proxied, namespace, echo_pod, protocol="auto")
            assert other.uses_spdy and await roundtrip(other, 65536)
            assert proxy.refused == 1, "one WebSocket attempt, then SPDY remembered for this server"
            assert [line.split()[0] for line in proxy.passed] == ["POST", "POST"]
            assert all(line.endswith(f"/namespaces/{namespace}/pods/{echo_pod}/portforward HTTP/1.1")
                       for line in proxy.passed)
            said = [r.getMessage() for r in caplog.records if "refused the WebSocket" in r.getMessage()]
            assert len(said) == 1 and f"127.0.0.1:{proxy.port}" in said[0]
            for t in (tunnel, other):
                t.close()
                await asyncio.wait_for(t.wait_closed(), 30)
        finally:
            portforward._refused_websocket.pop((proxied.host, None), None)
            await proxied.close()
