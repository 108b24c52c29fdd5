"""Test helpers for the sidecar: a real "app" (HTTP/1.1 + h2c on one port), the sidecar as a
real process, small HTTP/1.1 and h2 callers, a raw SSH control client, and auth material.

Also imported by tests/integration/test_agent_client*.py (by path), so it depends on nothing
from tpenv; keys are made with asyncssh directly.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import asyncssh
import h2.config
import h2.connection
import h2.events

REPO = Path(__file__).resolve().parents[2]
# The sidecar's interpreter: this one, or another to check the image's Python (the agent
# image runs Debian bookworm's 3.11.2): TPENV_AGENT_PYTHON=/path/to/python3 pytest agent/tests
PYTHON = os.environ.get("TPENV_AGENT_PYTHON") or sys.executable
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# The match of a header intercept the tests give alice (x-dev: alice, any path).
ALICE = {"headers": {"x-dev": "alice"}, "path": None}


# --- auth --------------------------------------------------------------------------------

def auth_material() -> dict[str, bytes]:
    ca = asyncssh.generate_private_key("ssh-ed25519")
    host = asyncssh.generate_private_key("ssh-ed25519")
    return {"ca_key": ca.export_private_key(), "ca.pub": ca.export_public_key(),
            "host_key": host.export_private_key(), "host_key.pub": host.export_public_key()}


def write_auth_dir(path: Path, material: dict[str, bytes]) -> Path:
    """What the agent sees: only ca.pub and host_key, as the Secret volume mounts them."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "ca.pub").write_bytes(material["ca.pub"])
    (path / "host_key").write_bytes(material["host_key"])
    os.chmod(path / "host_key", 0o600)
    return path


def session_cert(ca_key: bytes, principal: str) -> tuple[Any, Any]:
    ca = asyncssh.import_private_key(ca_key)
    key = asyncssh.generate_private_key("ssh-ed25519")
    now = int(time.time())
    return key, ca.generate_user_certificate(key, principal, principals=[principal],
                                             valid_after=now - 60, valid_before=now + 3600)


class Clock:
    """A fake monotonic clock for the pure parts' tests: advance ``now`` by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the app -----------------------------------------------------------------------------

class App:
    """HTTP/1.1 (keep-alive, Content-Length and chunked bodies) and h2c on one port.

    Every answer says who served it (``name``) and what it saw: JSON
    ``{"who", "path", "body_len", "header"}`` where ``header`` is the value of x-probe.
    h2 requests with ``content-type: application/grpc`` get trailers ``grpc-status: 0``
    and ``x-who``. Path ``/big?n=N`` answers N bytes (chunked on HTTP/1.1).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.requests = 0
        self.connections = 0
        self.gate = asyncio.Event()      # paths starting with /slow wait for it
        self.arrived = asyncio.Event()   # set when a /slow request arrives
        self.reset_seen = asyncio.Event()  # set when a caller resets an h2 stream
        self.stream_seen = asyncio.Event()  # set when an h2 request's headers arrive
        self.resets: list[int] = []
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "App":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        pass

    def answer(self, path: str, body_len: int, probe: str | None) -> bytes:
        return json.dumps({"who": self.name, "path": path, "body_len": body_len, "header": probe}).encode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            first = await reader.readexactly(1)
            rest = b""
            if first == b"P":
                rest = await reader.readexactly(len(PREFACE) - 1)
            if first + rest == PREFACE:
                await self._serve_h2(reader, writer)
            else:
                await self._serve_h1(first + rest, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve_h1(self, buf: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = buf + await reader.readuntil(b"\r\n\r\n")
            buf = b""
            lines = head[:-4].split(b"\r\n")
            method, target, version = lines[0].split(b" ")
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
            body = b""
            if headers.get(b"transfer-encoding") == b"chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    chunk = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    body += chunk[:-2]
            elif b"content-length" in headers:
                body = await reader.readexactly(int(headers[b"content-length"]))
            self.requests += 1
            path = target.decode()
            probe = headers.get(b"x-probe")
            close = headers.get(b"connection", b"").lower() == b"close"
            if headers.get(b"upgrade"):
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n")
                writer.write(self.name.encode() + b"\n")
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                return
            if path.startswith("/slow"):
                self.arrived.set()
                await self.gate.wait()
            if "/big?n=" in path:
                n = int(path.split("n=")[1])
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-who: " + self.name.encode() + b"\r\n\r\n")
                left = n
                while left:
                    part = min(left, 65536)
                    writer.write(b"%x\r\n" % part + b"x" * part + b"\r\n")
                    left -= part
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                data = self.answer(path, len(body), probe.decode() if probe else None)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
                             % (len(data), b"connection: close\r\n" if close else b"") + data)
            await writer.drain()
            if close or method == b"X-CLOSE":
                return

    async def _serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        conn.receive_data(PREFACE)
        writer.write(conn.data_to_send())
        reqs: dict[int, dict] = {}
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    reqs[ev.stream_id] = {"headers": dict(ev.headers), "body": 0}
                    self.stream_seen.set()
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if ev.stream_id in reqs:
                        reqs[ev.stream_id]["body"] += len(ev.data)
                elif isinstance(ev, h2.events.StreamReset):
                    reqs.pop(ev.stream_id, None)
                    self.resets.append(ev.error_code)
                    self.reset_seen.set()
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in reqs:
                    r = reqs.pop(ev.stream_id)
                    self.requests += 1
                    h = r["headers"]
                    if h[":path"].startswith("/reset"):  # the handler gives up on this stream
                        conn.reset_stream(ev.stream_id, 8)  # CANCEL
                        continue
                    if h[":path"].startswith("/slow"):
                        self.arrived.set()
                        writer.write(conn.data_to_send())
                        await self.gate.wait()
                    body = self.answer(h[":path"], r["body"], h.get("x-probe"))
                    grpc = h.get("content-type", "").startswith("application/grpc")
                    conn.send_headers(ev.stream_id, [(":status", "200"), ("content-type", h.get("content-type", "application/json"))])
                    conn.send_data(ev.stream_id, body, end_stream=not grpc)
                    if grpc:
                        conn.send_headers(ev.stream_id, [("grpc-status", "0"), ("x-who", self.name)], end_stream=True)
            writer.write(conn.data_to_send())
            await writer.drain()


# --- callers -----------------------------------------------------------------------------

class Http1:
    """A keep-alive HTTP/1.1 caller on one connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> "Http1":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.writer.close()

    async def request(self, path: str = "/", headers: dict[str, str] | None = None, body: bytes | None = None,
                      method: str = "GET", chunked: bool = False) -> tuple[int, dict[str, str], bytes]:
        lines = [f"{method} {path} HTTP/1.1", "host: app"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        payload = b""
        if body is not None and chunked:
            lines.append("transfer-encoding: chunked")
            for i in range(0, len(body), 1000):
                part = body[i:i + 1000]
                payload += b"%x\r\n" % len(part) + part + b"\r\n"
            payload += b"0\r\n\r\n"
        elif body is not None:
            lines.append(f"content-length: {len(body)}")
            payload = body
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        return await read_response(self.reader)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = b""
    return status, headers, body


async def first_answer(port: int, first: bytes, timeout: float = 10) -> bytes:
    """Connect to ``port`` on 127.0.0.1, send ``first``, and read until the other side closes:
    what an attacker's line got back (b"" when it was closed with nothing sent)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(first)
    try:
        return await asyncio.wait_for(r.read(), timeout)
    finally:
        w.close()


async def get_once(port: int, path: str = "/", headers: dict[str, str] | None = None) -> dict:
    """One request on a fresh connection; returns the app's JSON answer."""
    async with Http1(port) as c:
        status, _, body = await c.request(path, headers)
        assert status == 200, (status, body)
        return json.loads(body)


class H2Caller:
    """An h2c caller multiplexing streams on one connection (like a gRPC channel)."""

    def __init__(self, port: int, source: str | None = None, silence: float = 0) -> None:
        # silence: seconds connected before the preface (a channel opened ahead of its calls)
        self.port, self.source, self.silence = port, source, silence
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self._streams: dict[int, dict] = {}
        self._task: asyncio.Task | None = None
        self._window = asyncio.Event()

    async def __aenter__(self) -> "H2Caller":
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=(self.source, 0) if self.source else None)
        await asyncio.sleep(self.silence)
        self.conn.initiate_connection()
        self.writer.write(self.conn.data_to_send())
        self._task = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._task.cancel()
        self.writer.close()

    async def _read(self) -> None:
        while data := await self.reader.read(65536):
            for ev in self.conn.receive_data(data):
                if isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                    self._window.set()
                    self._window = asyncio.Event()
                s = self._streams.get(getattr(ev, "stream_id", 0))
                if s is None:
                    continue
                if isinstance(ev, h2.events.ResponseReceived):
                    s["headers"] = dict(ev.headers)
                elif isinstance(ev, h2.events.DataReceived):
                    s["body"] += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived):
                    s["trailers"] = dict(ev.headers)
                elif isinstance(ev, h2.events.StreamEnded):
                    s["done"].set_result(s)
                elif isinstance(ev, h2.events.StreamReset):
                    s["done"].set_exception(ConnectionError(f"reset {ev.error_code}"))
            self.writer.write(self.conn.data_to_send())
        for s in self._streams.values():
            if not s["done"].done():
                s["done"].set_exception(ConnectionError("connection closed"))

    def open_stream(self, path: str, headers: dict[str, str] | None = None) -> int:
        """Start a request (headers, no end of stream); see reset()."""
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "app")]
        self.conn.send_headers(sid, hdrs + list((headers or {}).items()), end_stream=False)
        self.writer.write(self.conn.data_to_send())
        return sid

    def reset(self, sid: int, code: int = 8) -> None:
        """Cancel a stream, as a gRPC client does on a deadline."""
        self.conn.reset_stream(sid, code)
        self.writer.write(self.conn.data_to_send())

    async def request(self, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
                      grpc: bool = False) -> dict:
        sid = self.conn.get_next_available_stream_id()
        s = {"headers": {}, "body": b"", "trailers": {}, "done": asyncio.get_running_loop().create_future()}
        self._streams[sid] = s
        hdrs = [(":method", "POST" if body or grpc else "GET"), (":path", path), (":scheme", "http"),
                (":authority", "app")]
        if grpc:
            hdrs += [("content-type", "application/grpc"), ("te", "trailers")]
        hdrs += list((headers or {}).items())
        self.conn.send_headers(sid, hdrs, end_stream=not body)
        self.writer.write(self.conn.data_to_send())
        while body:  # within the peer's flow-control window
            n = min(len(body), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if n == 0:
                await self._window.wait()
                continue
            self.conn.send_data(sid, body[:n], end_stream=n == len(body))
            body = body[n:]
            self.writer.write(self.conn.data_to_send())
        result = await s["done"]
        result["json"] = json.loads(result["body"]) if result["body"] else None
        return result


# --- the sidecar process -----------------------------------------------------------------

@dataclass
class Agent:
    proc: asyncio.subprocess.Process
    ssh: int
    health: int | None
    listeners: dict[str, int]
    stderr: list[bytes] = field(default_factory=list)
    watchers: list[tuple[bytes, asyncio.Future]] = field(default_factory=list)

    def port(self, name: str) -> int:
        return self.listeners[name]

    def log_seen(self, text: str, *, past: bool = False) -> asyncio.Future:
        """A future resolved when a log line containing ``text`` appears (from now on; with
        ``past``, a line already logged counts too)."""
        fut = asyncio.get_running_loop().create_future()
        seen = next((line for line in self.stderr if text.encode() in line), None) if past else None
        if seen is not None:
            fut.set_result(seen)
        else:
            self.watchers.append((text.encode(), fut))
        return fut


KUBELET_SOURCE = "127.0.0.9"  # where run_agent's stand-in for the kubelet probes from; no test dials from it


async def kubelet_probe(health_port: int, source: str = KUBELET_SOURCE) -> int:
    """One readiness probe of the agent's health port as the kubelet sends it (its user agent,
    from ``source``): the agent learns where the kubelet is, and its intercepts take traffic."""
    reader, writer = await asyncio.open_connection("127.0.0.1", health_port, local_addr=(source, 0))
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nhost: agent\r\nuser-agent: kube-probe/1.34\r\n\r\n")
        status, _, _ = await read_response(reader)
        return status
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def run_agent(tmp: Path, material: dict[str, bytes], listens: list[str], *, lease: float = 5,
                    extra: list[str] | None = None, env: dict[str, str] | None = None,
                    probed: bool = True) -> AsyncIterator[Agent]:
    """``python -m tpenv_agent sidecar`` on 127.0.0.1 port 0s; waits for its ready line. ``probed``:
    then probe it once as the kubelet would (from KUBELET_SOURCE), as every injected agent is before
    its pod is Ready: its intercepts take traffic only from that probe on (kubelet.py)."""
    auth = write_auth_dir(tmp / "auth", material)
    mounts = tmp / "mounts"
    mounts.mkdir(exist_ok=True)
    args = [PYTHON, "-m", "tpenv_agent", "sidecar", "--container", "app", "--ssh", "127.0.0.1:0", "--streams", "127.0.0.1:0",
            "--health", "127.0.0.1:0", "--auth-dir", str(auth), "--mounts", str(mounts), "--lease", str(lease),
            "--bind-host", "127.0.0.1", "--image-env", str(tmp / "image-env.json"), "--sniff-timeout", "0.5"]
    for spec in listens:
        args += ["--listen", spec]
    args += extra or []
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO / "agent"), **(env or {})})
    errors: list[bytes] = []
    watchers: list[tuple[bytes, asyncio.Future]] = []

    async def drain_stderr() -> None:
        while line := await proc.stderr.readline():
            errors.append(line)
            for text, fut in list(watchers):
                if text in line and not fut.done():
                    fut.set_result(line)

    drainer = asyncio.ensure_future(drain_stderr())
    line = await proc.stdout.readline()
    if not line:
        await proc.wait()
        await drainer
        raise RuntimeError("agent did not start:\n" + b"".join(errors).decode())
    info = json.loads(line)
    agent = Agent(proc, info["ssh"], info["health"], info["listeners"], errors, watchers)
    try:
        if probed:
            assert await kubelet_probe(agent.health) == 200
        yield agent
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        await drainer


# --- a raw control client (the agent's tests do not use tpenv's client) -------------------

class RawSession:
    """SSH + tpenv-control with nothing but asyncssh: enough to drive the agent in its tests."""

    def __init__(self, agent: Agent, material: dict[str, bytes], session: str) -> None:
        self.agent, self.material, self.session = agent, material, session
        self._ids = 0
        self.forward_port = 0

    async def __aenter__(self) -> "RawSession":
        key, cert = session_cert(self.material["ca_key"], self.session)
        self.conn = await asyncssh.connect(
            "127.0.0.1", self.agent.ssh, username=self.session, client_keys=[(key, cert)],
            known_hosts=([asyncssh.import_public_key(self.material["host_key.pub"])], [], []),
            agent_path=None, config=[])
        self.stdin, self.stdout, _ = await self.conn.open_session(subsystem="tpenv-control", encoding=None)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.conn.close()
        await self.conn.wait_closed()

    async def call(self, op: str, **fields: Any) -> dict:
        self._ids += 1
        self.stdin.write(json.dumps({"id": self._ids, "op": op, **fields}).encode() + b"\n")
        answer = json.loads(await self.stdout.readline())
        assert answer["id"] == self._ids
        return answer

    async def intercept(self, name: str, port: str, match: dict | None, local_port: int, **extra: Any) -> dict:
        self.forward_port += 1
        await self.conn.forward_remote_port("tpenv", self.forward_port, "127.0.0.1", local_port)
        return await self.call("intercept", intercept_id=f"{self.session}:{name}", port=port, match=match,
                               forward={"host": "tpenv", "port": self.forward_port}, **extra)
