"""The client side of the agent protocol (docs/protocol.md §2–§6): one SSH session to one agent.

    material = make_auth_material()                    # the Secret tpenv-auth's four keys
    async with AgentSession("sess1", ca_key=material["ca_key"],
                            host_key_pub=material["host_key.pub"], port=agent_ssh_port) as s:
        info = await s.hello()                          # done by __aenter__ too
        await s.intercept("web", port="http", match={"headers": {"x-dev": "alice"}}, local_port=8080)
        ...
        await s.leave("web")

Transport. By default the session dials ``host:port`` over TCP (tests). In a cluster the
agent's SSH port listens on the pod's loopback and is reached through the API server's
port-forward; pass ``tunnel=`` an object with

    async def create_connection(session_factory, host, port) -> (transport, protocol)

exactly as asyncssh's ``connect(tunnel=...)`` uses it: call ``protocol = session_factory()``
(an asyncio.Protocol, the SSH connection), then ``protocol.connection_made(transport)`` with
an asyncio-transport-like object (``write``, ``write_eof``/``can_write_eof``, ``close``,
``abort``, ``is_closing``, ``get_extra_info``, ``pause_reading``/``resume_reading``), feed
it ``data_received(bytes)``, ``eof_received()`` and ``connection_lost(exc)``, and honour its
``pause_writing``/``resume_writing`` calls; return ``(transport, protocol)``. ``host`` and
``port`` are passed through unchanged (the port-forward uses ``port``: the agent's SSH
port, 7922). The session never closes the tunnel object; its owner does.

Lease. The session pings every ``lease/5`` s (the agent's lease from ``hello``); when the
SSH connection or the control channel goes away, ``closed`` is set and every intercept of
this session is gone on the agent: reconnect and intercept again.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import asyncssh
from asyncssh.constants import OPEN_CONNECT_FAILED

from tpenv.kits.agent_streams import StreamPool
from tpenv.kits.sshjson import JsonChannelSession
from tpenv.logs import unit_logger
from tpenv.errors import (Conflict, Forbidden, NotFound, PermanentError, TpenvError, TransientError, TunnelDropped,
                          UsageError)
from tpenv.settings import AgentSettings, TunnelSettings
from tpenv_agent.authkeys import auth_material
from tpenv_agent.sftp_stream import SFTP_MAGIC
from tpenv_agent.sshtuning import CHANNEL_OPTIONS, CIPHERS

# The documented defaults (TPENV_AGENT_SSH_PORT, TPENV_TUNNELS_CONNECT_TIMEOUT): callers with
# settings pass theirs; one without gets these, never a private number that disagrees.
SSH_PORT = AgentSettings().ssh_port
CONNECT_TIMEOUT = TunnelSettings().connect_timeout

CLIENT_VERSION = "tpenv/0.1.0"
# The SFTP stream's read buffer: sshfs's replies above twice this pause the stream until its pump
# catches up (a read reply is read_size and a header; several are in flight).
SFTP_STREAM_LIMIT = 1 << 20
CERT_VALIDITY = 12 * 3600
FORWARD_HOST = "tpenv"


# The four keys of Secret ``tpenv-auth`` (§2): the manager's maker, under the name this module's
# callers (and its docstring's example) know.
make_auth_material = auth_material


def issue_session_key(ca_key: bytes | str | asyncssh.SSHKey, session_id: str) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
    """A fresh ed25519 key and its user certificate: key id and principal = ``session_id``, 12 h."""
    ca = ca_key if isinstance(ca_key, asyncssh.SSHKey) else asyncssh.import_private_key(ca_key)
    key = asyncssh.generate_private_key("ssh-ed25519")
    now = int(time.time())
    cert = ca.generate_user_certificate(
        key, session_id, principals=[session_id],
        valid_after=now - 300,  # tolerate clock skew between laptop and cluster
        valid_before=now + CERT_VALIDITY,
        permit_x11_forwarding=False, permit_agent_forwarding=False, permit_pty=False,
        permit_user_rc=False,
    )
    return key, cert


async def open_ssh(session_id: str, *, ca_key: bytes | str | asyncssh.SSHKey,
                   host_key: bytes | str | asyncssh.SSHKey, host: str, port: int, tunnel: Any = None,
                   timeout: float = 15.0, peer: str = "the agent",
                   restart: str = "restart the agent pods") -> asyncssh.SSHClientConnection:
    """An SSH connection to a tpenv SSH server (an agent, the manager's relay) as protocol §2
    says: a fresh session certificate signed with ``ca_key``, only ``host_key`` trusted.
    Errors: PermanentError (wrong host key), Forbidden (certificate refused), TunnelDropped.
    ``peer`` and ``restart`` word the messages ("the agent" / "restart the agent pods")."""
    key, cert = issue_session_key(ca_key, session_id)
    trusted = host_key if isinstance(host_key, asyncssh.SSHKey) else asyncssh.import_public_key(host_key)
    try:
        return await asyncio.wait_for(asyncssh.connect(
            host, port, tunnel=tunnel,
            username=session_id, client_keys=[(key, cert)],
            known_hosts=([trusted], [], []),
            preferred_auth="publickey", agent_path=None, config=[],
            keepalive_interval=5, keepalive_count_max=3,
            encryption_algs=list(CIPHERS), **CHANNEL_OPTIONS,
        ), timeout)
    except asyncssh.HostKeyNotVerifiable as e:
        raise PermanentError(f"{peer}'s host key is not the one in Secret tpenv-auth",
                             hint=f"someone may be impersonating {peer}, or the Secret was recreated: {restart}") from e
    except asyncssh.PermissionDenied as e:
        raise Forbidden(f"{peer} refused this session's certificate",
                        hint=f"the Secret tpenv-auth may have been recreated: {restart}") from e
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
        raise TunnelDropped(f"cannot reach {peer}: {type(e).__name__}: {e}") from e


class _Inflight:
    """The forwarded connections of one intercept still open on this machine (see ``leave``)."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def opened(self) -> None:
        self.count += 1
        self.idle.clear()

    def closed(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self.idle.set()


class _TrackedForwarder(asyncssh.SSHForwarder):
    """asyncssh's forwarder of one ``forwarded-tcpip`` channel, telling ``_Inflight`` when it ends
    (counted as opened already: from the moment the channel was offered, see ``forward``)."""

    def __init__(self, peer: asyncssh.SSHForwarder, inflight: _Inflight) -> None:
        super().__init__(peer)
        self._inflight = inflight

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            if self._inflight is not None:
                self._inflight.closed()
                self._inflight = None  # type: ignore[assignment]


_ERRORS = {"conflict": Conflict, "not-found": NotFound, "bad-request": UsageError, "forbidden": Forbidden}


class AgentSession(JsonChannelSession):
    """One SSH connection and control channel to one agent, usable as ``async with``.

    ``close()`` (safe twice) ends the session: the agent drops its intercepts at once. The
    channel's plumbing (ids, pending answers, loss) is :class:`~tpenv.kits.sshjson.JsonChannelSession`'s.
    """

    def __init__(self, session_id: str, *, ca_key: bytes | str | asyncssh.SSHKey, host_key_pub: bytes | str,
                 host: str = "127.0.0.1", port: int = SSH_PORT, tunnel: Any = None,
                 client_version: str = CLIENT_VERSION, connect_timeout: float = CONNECT_TIMEOUT,
                 token: str | None = None, streams: int = 0, sftp_stream: bool = True) -> None:
        if ":" in session_id or not session_id:
            raise UsageError(f"bad session id {session_id!r}: it may not be empty or contain ':'")
        super().__init__(unit_logger("agent", session_id), what="agent session",
                         eof_why="control channel closed by the agent")
        self.session_id = session_id
        self._ca_key = ca_key
        self._host_key = asyncssh.import_public_key(host_key_pub)
        self._host, self._port, self._tunnel = host, port, tunnel
        self._client_version = client_version
        self._connect_timeout = connect_timeout
        # The kubeconfig's bearer token: the agent asks the cluster whose it is (protocol §2.1).
        self._token = token
        self.info: dict[str, Any] = {}
        self._ports = itertools.count(1)
        self._forwards: dict[str, asyncssh.SSHListener] = {}
        self._inflight: dict[str, _Inflight] = {}
        # Mirror counters of this session's intercepts, by intercept id, from the last ping answer.
        self.mirror_stats: dict[str, dict[str, int]] = {}
        # Port-forward streams parked at the agent once this session intercepts (agent_streams.py):
        # how many, the pool, and each forward port's (handler port, in-flight counter).
        self._stream_count = streams
        self.streams: StreamPool | None = None
        # A mount's SFTP on a port-forward stream of its own when the agent offers one
        # (agent/tpenv_agent/sftp_stream.py); else the SSH connection's sftp subsystem.
        self._sftp_stream = sftp_stream
        self._routes: dict[int, tuple[int, _Inflight]] = {}

    @property
    def cipher(self) -> str | None:
        """The SSH cipher this session's connection negotiated (sent, received: the same here)."""
        return self._conn.get_extra_info("send_cipher") if self._conn is not None else None

    # --- lifecycle (the rest: JsonChannelSession) --------------------------------------
    async def connect(self) -> dict[str, Any]:
        """Dial, authenticate, open the control channel, say hello, start pinging."""
        self._conn = await open_ssh(self.session_id, ca_key=self._ca_key, host_key=self._host_key,
                                    host=self._host, port=self._port, tunnel=self._tunnel,
                                    timeout=self._connect_timeout)
        try:
            await self._open_channel("tpenv-control", "the agent refused the control channel")
        except TunnelDropped:
            self._conn.close()
            raise
        try:
            self.info = await asyncio.wait_for(self.hello(), self._connect_timeout)
        except BaseException as e:
            self.close()
            if isinstance(e, asyncio.TimeoutError):
                raise TunnelDropped("the agent did not answer hello") from e
            raise
        lease = float(self.info.get("lease") or 5)
        self._tasks.append(asyncio.ensure_future(self._ping_loop(lease / 5, lease)))
        self.log.info("connected to pod %s (%s)", self.info.get("pod"), self.cipher)
        return self.info

    def close(self) -> None:
        if self.streams is not None:
            self.streams.close()
        super().close()

    async def _start_streams(self) -> None:
        """Park streams at the agent, if it offers them and this session wants some. Only a fast
        path: when the agent refuses the channel, intercepted connections use SSH channels."""
        offer = self.info.get("streams")
        if self.streams is not None or self._stream_count <= 0 or not isinstance(offer, dict) \
                or "streams" not in (self.info.get("features") or []):
            return
        assert self._conn is not None
        try:
            stdin, stdout, _ = await self._conn.open_session(subsystem="tpenv-streams", encoding=None)
        except (OSError, asyncssh.Error) as e:
            self.log.info("the agent refused the streams channel (%s): SSH channels only", e)
            self._stream_count = 0
            return
        self.streams = StreamPool(self._stream_connect(), self._host, int(offer["port"]), str(offer["token"]), self._routes.get,
                                  size=self._stream_count, log=self.log, events_writer=stdin)
        self._tasks.append(asyncio.ensure_future(self.streams.read_events(stdout)))
        self.streams.start()

    def _stream_connect(self) -> Any:
        """``create_connection`` for a port-forward stream to the agent's stream port."""
        if self._tunnel is not None:
            # A pipe of its own per stream (kits/portforward.py, isolated connections: SPDY first).
            isolated = getattr(self._tunnel, "isolated", None)
            return (isolated() if isolated is not None else self._tunnel).create_connection
        return asyncio.get_running_loop().create_connection

    # --- control channel ---------------------------------------------------------------
    async def _ping_loop(self, every: float, lease: float) -> None:
        # A timer, not a readiness poll: the lease needs a heartbeat. A ping unanswered for a
        # whole lease means the agent has dropped our intercepts already: say so now rather
        # than when SSH keepalives give up.
        while True:
            await asyncio.sleep(every)
            try:
                answer = await asyncio.wait_for(self.request("ping"), max(lease, 1.0))
                self.mirror_stats = dict(answer.get("mirror") or {})
            except asyncio.TimeoutError:
                self._lost("no answer to ping within the lease")
                return
            except TunnelDropped:
                return

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request/answer on the control channel; errors mapped to tpenv.errors."""
        answer = await self._exchange(op, fields)
        if answer.get("ok"):
            return answer
        err = answer.get("error") or {}
        cls = _ERRORS.get(err.get("code"), TransientError if err.get("code") == "internal" else PermanentError)
        raise cls(f"agent: {err.get('message', 'unknown error')}")

    # --- operations --------------------------------------------------------------------
    async def hello(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"session": self.session_id, "client": self._client_version}
        if self._token:
            fields["token"] = self._token
        answer = await self.request("hello", **fields)
        return {k: v for k, v in answer.items() if k not in ("id", "ok")}

    async def intercept(self, name: str, port: str | int, match: dict[str, Any] | None, local_port: int,
                        *, force: bool = False, mode: str = "intercept") -> dict[str, Any]:
        """Route the agent port's traffic (all of it, or the HTTP requests ``match`` selects) to
        ``127.0.0.1:local_port``; ``mode="mirror"``: copies of them, the app still answering.
        Calling it again with the same name replaces the rule; an intercept another user holds
        only with ``force`` and the RBAC right (protocol §3)."""
        assert self._conn is not None
        if mode != "intercept" and mode not in (self.info.get("features") or []):
            # An older agent ignores the field and would take the traffic instead of copying it.
            raise PermanentError(f"the agent in pod {self.info.get('pod')} ({self.info.get('agent', '?')}) cannot "
                                 f"{mode} requests", hint="restart the workload's pods to get the current agent, "
                                                          "or `tpenv uninstall --agent WORKLOAD` and intercept again")
        listen_port = next(self._ports)
        inflight = self._inflight.setdefault(name, _Inflight())
        loop = asyncio.get_running_loop()

        async def forward(_orig_host: str, _orig_port: int) -> asyncssh.SSHForwarder:
            # asyncssh's forward_connection, counted from the offer on: leave() waits for these.
            inflight.opened()
            try:
                _, peer = await loop.create_connection(asyncssh.SSHForwarder, "127.0.0.1", local_port)
            except BaseException as e:  # the agent then sends this connection or request to the app
                inflight.closed()
                if isinstance(e, OSError):
                    raise asyncssh.ChannelOpenError(OPEN_CONNECT_FAILED, str(e)) from None
                raise
            return _TrackedForwarder(peer, inflight)

        try:
            listener = await self._conn.create_server(forward, FORWARD_HOST, listen_port, **CHANNEL_OPTIONS)
        except (OSError, asyncssh.Error, asyncssh.ChannelListenError) as e:
            raise TunnelDropped(f"the agent refused the forward: {e}") from e
        try:
            answer = await self.request("intercept", intercept_id=f"{self.session_id}:{name}", port=port,
                                        match=match, forward={"host": FORWARD_HOST, "port": listen_port},
                                        **({"force": True} if force else {}),
                                        **({"mode": mode} if mode != "intercept" else {}))
        except BaseException:
            listener.close()
            raise
        old = self._forwards.pop(name, None)
        self._forwards[name] = listener
        self._routes[listen_port] = (local_port, inflight)
        if old is not None:
            self._routes.pop(old.get_port(), None)
            old.close()
        await self._start_streams()
        return answer["intercept"]

    async def leave(self, name: str, *, intercept_id: str | None = None, force: bool = False,
                    drain: float = 0.0) -> None:
        """End this session's intercept ``name``; or, with ``force`` (and the RBAC right), any
        ``intercept_id``. With ``drain``, then wait up to that many seconds for the connections
        and requests the agent sent us before the leave to finish: the agent sends nothing new
        once it answered, and closing the session earlier would cut them (a caller would see its
        connection closed before any answer)."""
        await self.request("leave", intercept_id=intercept_id or f"{self.session_id}:{name}",
                           **({"force": True} if force else {}))
        inflight = self._inflight.pop(name, None)
        deadline = asyncio.get_running_loop().time() + drain
        await self._drain(name, inflight, deadline)
        # The agent may still offer a channel for a request it routed just before the leave:
        # closing the forward now refuses later offers (the agent sends those to the app); the
        # ones offered meanwhile are counted, and waited for too.
        listener = self._forwards.pop(name, None)
        if listener is not None:
            listener.close()
            self._routes.pop(listener.get_port(), None)  # a stream offered from now on is refused too
        await self._drain(name, inflight, deadline)

    async def _drain(self, name: str, inflight: _Inflight | None, deadline: float) -> None:
        if inflight is None or inflight.idle.is_set():
            return
        left = deadline - asyncio.get_running_loop().time()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            await asyncio.wait_for(inflight.idle.wait(), left)
        except asyncio.TimeoutError:
            self.log.info("intercept %s: %d connection(s) still open at the drain's end; closing them", name,
                          inflight.count)

    async def list(self) -> list[dict[str, Any]]:
        return (await self.request("list"))["intercepts"]

    async def env(self) -> dict[str, str]:
        return (await self.request("env"))["env"]

    async def mounts(self) -> dict[str, Any]:
        """``{"root": "/tpenv/mounts", "mounts": [app mount paths]}``."""
        answer = await self.request("mounts")
        return {"root": answer["root"], "mounts": answer["mounts"]}

    async def open_sftp_channel(self) -> tuple[Any, Any]:
        """(writer, reader) of the agent's SFTP server, for ``sshfs -o passive`` (copy bytes
        between these and sshfs's stdio): on a port-forward stream of its own when the agent
        offers one, else a channel running the SSH connection's ``sftp`` subsystem."""
        assert self._conn is not None
        if self._sftp_stream and "sftp-stream" in (self.info.get("features") or []):
            try:
                return await self._open_sftp_stream()
            except (OSError, asyncio.TimeoutError, TpenvError) as e:  # a fast path: SSH still serves
                self.log.info("no SFTP stream (%s: %s): the mount goes over SSH", type(e).__name__, e)
        try:
            stdin, stdout, _ = await self._conn.open_session(subsystem="sftp", encoding=None)
        except (OSError, asyncssh.Error) as e:
            raise TunnelDropped(f"the agent refused the sftp channel: {e}") from e
        return stdin, stdout

    async def _open_sftp_stream(self) -> tuple[asyncio.StreamWriter, asyncio.StreamReader]:
        """A port-forward stream to the agent's stream port, introduced as this session's SFTP
        (agent/tpenv_agent/sftp_stream.py): no SSH framing or encryption, no queueing behind the
        SSH connection's other channels."""
        offer = self.info.get("streams")
        if not isinstance(offer, dict):
            raise TunnelDropped("the agent offered no stream port")
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=SFTP_STREAM_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await asyncio.wait_for(
            self._stream_connect()(lambda: protocol, self._host, int(offer["port"])), self._connect_timeout)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            writer.write(SFTP_MAGIC + str(offer["token"]).encode("ascii") + b"\n")
            answer = await asyncio.wait_for(reader.readline(), self._connect_timeout)
        except BaseException:
            writer.transport.abort()
            raise
        if answer != b"+\n":
            writer.transport.abort()
            raise TunnelDropped(f"the agent refused the SFTP stream ({answer[:40]!r})")
        self.log.info("mount SFTP on a port-forward stream of its own")
        return writer, reader

    async def sftp(self) -> asyncssh.SFTPClient:
        """An asyncssh SFTP client on the agent's mounts (sync mode, tests)."""
        assert self._conn is not None
        return await self._conn.start_sftp_client()
