"""The port-forward transport against a local server speaking the kubelet's WebSocket framing.

``FakeKubelet`` is a protocol-level test double: a real ``websockets`` server on 127.0.0.1 that
speaks ``v4.channel.k8s.io`` the way kubelet ``websocket.go`` + apimachinery ``wsstream`` do
(channel byte per message, data channel 0 / error channel 1, the port as 2 bytes little-endian
as the first message of each channel, the reason as text on the error channel before closing)
and relays to real local TCP servers. It checks the bearer token like the API server would.
Against the real cluster the same transport is tested in tests/e2e/test_portforward*.py.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
import textwrap
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import asyncssh
import pytest
from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.http11 import Response

from tpenv.errors import Forbidden, NotFound, TunnelDropped
from tpenv.kits.kube import Kube
from tpenv.kits.portforward import PodTunnel

TOKEN = "s3cret-token"
pytestmark = pytest.mark.timeout(60)


class FakeKubelet:
    """API server + kubelet port-forward, framing only; pods are names, ports are 127.0.0.1 ports."""

    def __init__(self) -> None:
        self.pods = {"hello-1"}
        self.connections: set = set()
        self.server = None
        self.port = 0

    async def __aenter__(self) -> "FakeKubelet":
        self.server = await serve(self._handle, "127.0.0.1", 0, subprotocols=["v4.channel.k8s.io"],
                                  process_request=self._check, compression=None, max_size=None)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    def _status(self, code: int, message: str) -> Response:
        body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": code}).encode()
        return Response(code, "refused", Headers({"Content-Type": "application/json"}), body)

    def _check(self, conn, request):
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._status(403, 'pods "x" is forbidden: User "nobody" cannot create resource "pods/portforward"')
        pod = request.path.split("/")[6]
        if pod not in self.pods:
            return self._status(404, f'pods "{pod}" not found')
        return None

    async def _handle(self, ws) -> None:
        self.connections.add(ws)
        port = int(parse_qs(urlparse(ws.request.path).query)["ports"][0])
        pb = struct.pack("<H", port)
        await ws.send(b"\x00" + pb)
        await ws.send(b"\x01" + pb)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            await ws.send(b"\x01" + f"error forwarding port {port} to pod hello-1: {e.strerror}".encode())
            await ws.close()
            return

        async def up():
            async for msg in ws:
                if msg[0] == 0:
                    writer.write(msg[1:])
                    await writer.drain()
            writer.close()

        async def down():
            while data := await reader.read(32768):
                await ws.send(b"\x00" + data)
            await ws.close()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            writer.close()
            self.connections.discard(ws)

    async def drop_all(self, reason: str) -> None:
        """What the kubelet does when the pod goes away mid-stream: error text, then close."""
        for ws in list(self.connections):
            await ws.send(b"\x01" + reason.encode())
            await ws.close()


async def echo_server():
    async def handle(r, w):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def write_kubeconfig(path: Path, port: int, token: str = TOKEN) -> Path:
    path.write_text(textwrap.dedent(f"""\
        apiVersion: v1
        kind: Config
        clusters:
        - name: fake
          cluster: {{server: "http://127.0.0.1:{port}"}}
        users:
        - name: dev
          user: {{token: "{token}"}}
        contexts:
        - name: fake
          context: {{cluster: fake, user: dev, namespace: team}}
        current-context: fake
        """))
    return path


@pytest.fixture
async def kubelet():
    async with FakeKubelet() as k:
        yield k


@pytest.fixture
async def kube(kubelet, tmp_path):
    k = await Kube.load(str(write_kubeconfig(tmp_path / "kubeconfig", kubelet.port)))
    yield k
    await k.close()


# -- stage 1: one stream, bytes both ways ---------------------------------------------------------

async def test_stream_round_trip_and_clean_eof(kube):
    server, port = await echo_server()
    async with server:
        reader, writer = await PodTunnel(kube, "team", "hello-1").open_stream(port)
        writer.write(b"hello through the kubelet\n")
        await writer.drain()
        assert await reader.readline() == b"hello through the kubelet\n"
        writer.close()
        await writer.wait_closed()
        writer.close()  # close() twice is safe


async def test_pod_side_close_is_a_clean_eof(kube):
    async def once(r, w):
        w.write(b"bye")
        await w.drain()
        w.close()

    server = await asyncio.start_server(once, "127.0.0.1", 0)
    async with server:
        reader, writer = await PodTunnel(kube, "team", "hello-1").open_stream(server.sockets[0].getsockname()[1])
        assert await reader.read() == b"bye"  # EOF, no exception
        writer.close()


# -- stage 2: many concurrent streams, a large transfer checked by hash ----------------------------

async def test_many_concurrent_streams(kube):
    server, port = await echo_server()
    tunnel = PodTunnel(kube, "team", "hello-1")

    async def one(i: int) -> bool:
        reader, writer = await tunnel.open_stream(port)
        payload = os.urandom(1000 + i * 37)
        writer.write(payload)
        await writer.drain()
        got = await reader.readexactly(len(payload))
        writer.close()
        return got == payload

    async with server:
        results = await asyncio.gather(*(one(i) for i in range(60)))
    assert all(results)
    tunnel.close()
    await tunnel.wait_closed()


async def test_large_transfer_hash_matches(kube):
    server, port = await echo_server()
    size = 24 * 1024 * 1024
    async with server:
        reader, writer = await PodTunnel(kube, "team", "hello-1").open_stream(port)
        sent, got = hashlib.sha256(), hashlib.sha256()

        async def pump():
            for _ in range(size // 65536):
                block = os.urandom(65536)
                sent.update(block)
                writer.write(block)
                await writer.drain()  # flow control: pause_writing/resume_writing must work

        task = asyncio.ensure_future(pump())
        n = 0
        while n < size:
            data = await reader.read(262144)
            assert data
            got.update(data)
            n += len(data)
        await task
        writer.close()
    assert got.hexdigest() == sent.hexdigest()


# -- stage 3: failures arrive promptly, with the server's words -------------------------------------

async def test_nothing_listening_is_tunnel_dropped_with_kubelet_text(kube):
    s = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = s.sockets[0].getsockname()[1]
    s.close()
    await s.wait_closed()
    reader, writer = await PodTunnel(kube, "team", "hello-1").open_stream(port)
    with pytest.raises(TunnelDropped, match=f"error forwarding port {port}"):
        await asyncio.wait_for(reader.read(), 5)


async def test_drop_mid_stream_reports_the_reason(kube, kubelet):
    server, port = await echo_server()
    async with server:
        reader, writer = await PodTunnel(kube, "team", "hello-1").open_stream(port)
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        await kubelet.drop_all("pod hello-1 was deleted")
        with pytest.raises(TunnelDropped, match="pod hello-1 was deleted"):
            await asyncio.wait_for(reader.read(), 5)


async def test_missing_pod_is_not_found(kube):
    with pytest.raises(NotFound, match='pods "gone" not found'):
        await PodTunnel(kube, "team", "gone").open_stream(80)


async def test_bad_credentials_are_forbidden_with_can_i_hint(kubelet, tmp_path):
    k = await Kube.load(str(write_kubeconfig(tmp_path / "kc", kubelet.port, token="wrong")))
    with pytest.raises(Forbidden) as err:
        await PodTunnel(k, "team", "hello-1").open_stream(80)
    assert "kubectl auth can-i create pods/portforward -n team" in err.value.hint
    await k.close()


# -- stage 4: SSH over the tunnel (asyncssh tunnel= protocol) --------------------------------------

async def test_asyncssh_runs_over_pod_tunnel(kube):
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username):
            return True

        def public_key_auth_supported(self):
            return True

        def validate_public_key(self, username, key):
            return key.public_data == client_key.public_data

    async def process(proc):
        data = await proc.stdin.read()
        proc.stdout.write(hashlib.sha256(data).hexdigest().encode())
        proc.exit(0)

    server = await asyncssh.create_server(Server, "127.0.0.1", 0, server_host_keys=[host_key],
                                          process_factory=process, encoding=None)
    port = server.sockets[0].getsockname()[1]
    payload = os.urandom(512 * 1024)
    try:
        async with asyncssh.connect("pod", port, tunnel=PodTunnel(kube, "team", "hello-1"), username="dev",
                                    client_keys=[client_key], known_hosts=None) as conn:
            result = await conn.run(input=payload, encoding=None)
            assert result.stdout.decode() == hashlib.sha256(payload).hexdigest()
    finally:
        server.close()
        await server.wait_closed()


# -- stage 5: sshfs in passive mode over an sftp channel over the tunnel (the mount data path) -----

async def test_sshfs_mount_over_pod_tunnel_reads_and_writes(kube, tmp_path):
    from tpenv.engine.mounts import SshfsMount, is_mounted

    served = tmp_path / "pod"  # what the agent serves at /tpenv/mounts
    (served / "var" / "data").mkdir(parents=True)
    (served / "var" / "data" / "from-cluster.txt").write_text("written in the pod\n")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username):
            return True

        def public_key_auth_supported(self):
            return True

        def validate_public_key(self, username, key):
            return key.public_data == client_key.public_data

    server = await asyncssh.create_server(Server, "127.0.0.1", 0, server_host_keys=[host_key],
                                          sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(served)))
    port = server.sockets[0].getsockname()[1]
    local = tmp_path / "vol"
    try:
        async with asyncssh.connect("pod", port, tunnel=PodTunnel(kube, "team", "hello-1"), username="dev",
                                    client_keys=[client_key], known_hosts=None) as conn:
            async def open_sftp():
                writer, reader, _ = await conn.open_session(subsystem="sftp", encoding=None)
                return writer, reader

            mount = SshfsMount(open_sftp, local, name="hello")
            async with mount:
                assert is_mounted(local)
                got = await asyncio.to_thread((local / "var" / "data" / "from-cluster.txt").read_text)
                assert got == "written in the pod\n"
                await asyncio.to_thread((local / "var" / "data" / "from-laptop.txt").write_text, "hi pod\n")
            await mount.stop()  # safe twice
            assert not is_mounted(local)
        assert (served / "var" / "data" / "from-laptop.txt").read_text() == "hi pod\n"
    finally:
        server.close()
        await server.wait_closed()
