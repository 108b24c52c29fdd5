"""The agent's SSH server (contract §2, §4, §6): certificates only, no sockets for forwards.

Clients authenticate with an OpenSSH user certificate signed by the namespace's CA
(``ca.pub`` in ``--auth-dir``) whose principal is the SSH user name; there is no password,
keyboard-interactive or plain-key login. ``tcpip-forward`` requests are accepted without
opening a socket (``server_requested`` returns a socketless listener): the agent opens
``forwarded-tcpip`` channels to them itself when traffic matches an intercept.
"""
from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import asyncssh

from . import log as logs
from .control import ControlChannel
from .sftp import ConfinedSFTPServer
from .splice import Buffered
from . import streams as parked
from .sshtuning import CHANNEL_OPTIONS, CIPHERS

if TYPE_CHECKING:
    from .sidecar import Sidecar


class _Forward(asyncssh.SSHListener):
    """A forward registration: the client's (listen_host, listen_port); nothing listens."""

    def __init__(self, state: "ConnState", key: tuple[str, int]) -> None:
        super().__init__()
        self._state, self._key = state, key

    def get_port(self) -> int:
        return self._key[1]

    def close(self) -> None:  # cancel-tcpip-forward, or the connection went away
        self._state.forwards.discard(self._key)

    async def wait_closed(self) -> None:
        return None


class CertOnlyServer(asyncssh.SSHServer):
    """Protocol §2's login rules, shared by the sidecar and the manager's relay: the SSH user is
    the session id, and the only way in is a user certificate (``authorized_client_keys`` from
    :func:`auth_from_material` trusts nothing but the CA; asyncssh checks that the user name is
    one of the certificate's principals)."""

    username = ""

    def begin_auth(self, username: str) -> bool:
        self.username = username
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False


class ConnState(CertOnlyServer):
    """One SSH connection: its user (= session id), forwards and control channels."""

    def __init__(self, sidecar: "Sidecar") -> None:
        self.sidecar = sidecar
        self.conn: Any = None
        self.username = ""
        self.forwards: set[tuple[str, int]] = set()
        self.controls: list[ControlChannel] = []
        # Port-forward streams this session parked, and those carrying connections (streams.py).
        self.streams: deque = deque()
        self.live_streams: dict[int, Any] = {}
        self.sftp_streams: set = set()  # its SFTP on streams of their own (sftp_stream.py)
        self.events: Any = None  # its tpenv-streams channel, once open
        self.stream_token: str | None = None
        self.next_stream = 0
        self._next_dynamic = 40000
        self.log = logs.unit("ssh", "server")

    def connection_made(self, conn: Any) -> None:
        self.conn = conn
        self.sidecar.ssh_conns[conn] = self

    def connection_lost(self, exc: Exception | None) -> None:
        self.sidecar.ssh_conns.pop(self.conn, None)
        if self.sidecar.stream_port is not None:
            self.sidecar.stream_port.forget(self)
        for s in [*self.streams, *self.live_streams.values(), *self.sftp_streams]:  # streams die with their session
            s.abort()
        self.streams.clear()
        for ctl in list(self.controls):
            ctl.end("SSH connection lost")
        if self.username:
            self.log.info("session %s disconnected", self.username)

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        if listen_port == 0:
            self._next_dynamic += 1
            listen_port = self._next_dynamic
        key = (listen_host.lower(), listen_port)
        self.forwards.add(key)
        return _Forward(self, key)

    def opener(self, forward: tuple[str, int]) -> Callable[..., Any]:
        """Opens a forwarded-tcpip channel to ``forward``: as streams, or with a session factory."""
        conn = self.conn

        async def open_streams(orig: tuple[str, int] = ("", 0)) -> tuple[Buffered, Any]:
            if self.streams:  # a parked port-forward stream first: no SSH in the path (streams.py)
                loop = asyncio.get_running_loop()
                reader = asyncio.StreamReader(limit=1 << 20, loop=loop)
                proto = asyncio.StreamReaderProtocol(reader, loop=loop)
                transport = await parked.take(self, forward[1], orig, proto)
                if transport is not None:
                    return Buffered(reader), asyncio.StreamWriter(transport, proto, reader, loop)
            r, w = await conn.open_connection(forward[0], forward[1], orig[0], orig[1], **CHANNEL_OPTIONS)
            return Buffered(r), w

        async def open_session(factory: Callable[[], Any], orig: tuple[str, int] = ("", 0)) -> Any:
            if self.streams:
                session = factory()
                if await parked.take(self, forward[1], orig, session) is not None:
                    return session
            _, session = await conn.create_connection(factory, forward[0], forward[1], orig[0], orig[1],
                                                      **CHANNEL_OPTIONS)
            return session

        open_streams.session = open_session  # type: ignore[attr-defined]
        return open_streams


def auth_from_material(ca_pub: bytes | str, host_key: bytes | str) -> tuple[Any, Any]:
    """(host key, authorized keys trusting only the CA) from Secret tpenv-auth's ``ca.pub`` and
    ``host_key`` (protocol §2). Raises ``asyncssh.KeyImportError`` on a malformed key."""
    ca = ca_pub.decode("ascii") if isinstance(ca_pub, bytes) else ca_pub
    authorized = asyncssh.import_authorized_keys(f"cert-authority {ca.strip()}\n")
    return asyncssh.import_private_key(host_key), authorized


def read_auth(auth_dir: str) -> tuple[Any, Any]:
    """(host key, authorized keys trusting only the CA), from the mounted Secret's two files."""
    with open(os.path.join(auth_dir, "ca.pub"), "rb") as f:
        ca_pub = f.read()
    with open(os.path.join(auth_dir, "host_key"), "rb") as f:
        host_key = f.read()
    return auth_from_material(ca_pub, host_key)


# Connection options every tpenv SSH server uses: no agent or X11 forwarding, keepalives that
# drop a dead client (port-forward cut, laptop asleep) within ~15 s, the data path's tuning.
SERVER_OPTIONS: dict[str, Any] = {
    "agent_forwarding": False,
    "x11_forwarding": False,
    "keepalive_interval": 5,
    "keepalive_count_max": 3,
    "encryption_algs": list(CIPHERS),
    **CHANNEL_OPTIONS,
}


async def start(sidecar: "Sidecar", host: str, port: int, auth_dir: str) -> Any:
    host_key, authorized = read_auth(auth_dir)

    async def process(proc: Any) -> None:
        state = sidecar.ssh_conns.get(proc.get_extra_info("connection"))
        if proc.subsystem == "tpenv-streams" and state is not None and sidecar.stream_port is not None:
            await parked.Events(state, proc).run()
            return
        if proc.subsystem != "tpenv-control" or state is None:
            proc.stderr.write(b"only the tpenv-control, tpenv-streams and sftp subsystems are served\n")
            proc.exit(1)
            return
        await ControlChannel(sidecar, state, proc).run()

    def sftp(chan: Any) -> asyncssh.SFTPServer:
        return ConfinedSFTPServer(chan, sidecar.mounts_root)

    return await asyncssh.create_server(
        lambda: ConnState(sidecar), host, port,
        server_host_keys=[host_key],
        authorized_client_keys=authorized,
        process_factory=process,
        sftp_factory=sftp,
        allow_scp=False,
        encoding=None,
        **SERVER_OPTIONS,
    )
