"""The client of the manager's outbound relay (docs/protocol.md §7): cluster addresses and names
from the developer's machine, through one SSH connection to the manager pod.

    async with RelaySession(kube) as relay:
        answer = await relay.resolve("hello", namespace="shop")   # {"name", "addresses", "cname"}
        reader, writer = await relay.open_connection("hello.shop", 80)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        ...

``RelaySession`` finds a Ready manager pod in namespace ``tpenv``, reads Secret ``tpenv-auth``
there (the relay's CA and host key), and connects over the API server's port-forward
(:class:`tpenv.kits.portforward.PodTunnel`) with a fresh session certificate, exactly like an
agent session (:func:`tpenv.kits.agent_client.open_ssh`). RBAC: Role ``tpenv-relay-client``.

``open_connection`` returns asyncssh's stream pair (``SSHReader``/``SSHWriter``: ``read``,
``readexactly``, ``readline``, ``readuntil`` / ``write``, ``drain``, ``write_eof``, ``close``,
``wait_closed``), each one ``direct-tcpip`` channel. A destination the relay refuses raises
:class:`~tpenv.errors.Forbidden` carrying the relay's reason; nothing was sent to it.

This is the transport of ``tpenv connect`` (outbound traffic); it holds no local listeners.
"""
from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncssh
from asyncssh.constants import OPEN_ADMINISTRATIVELY_PROHIBITED

from tpenv.errors import Forbidden, NotFound, PermanentError, TransientError, TunnelDropped, UsageError
from tpenv.kits.agent_client import CONNECT_TIMEOUT, open_ssh
from tpenv.kits.aio import unit_logger
from tpenv.kits.kube import Kube, What, pod_is_ready
from tpenv.kits.portforward import PodTunnel
from tpenv.kits.sshjson import JsonChannelSession
from tpenv_agent.sshtuning import CHANNEL_OPTIONS

NAMESPACE = "tpenv"
RELAY_PORT = 8022
SUBSYSTEM = "tpenv-resolve"
AUTH_SECRET = "tpenv-auth"
MANAGER_SELECTOR = "app.kubernetes.io/name=tpenv-manager"
RESTART = "restart the manager: kubectl -n tpenv rollout restart deployment/tpenv-manager"


async def find_manager_pod(kube: Kube, namespace: str = NAMESPACE) -> str:
    """The name of a Ready manager pod (the newest); NotFound when there is none."""
    pods = await kube.call(kube.core.list_namespaced_pod, namespace, label_selector=MANAGER_SELECTOR,
                           what=What("list", "pods", namespace))
    ready = [p for p in (pods or {}).get("items") or [] if pod_is_ready(p) and not p["metadata"].get("deletionTimestamp")]
    if not ready:
        raise NotFound(f"no Ready tpenv manager pod in namespace {namespace!r}",
                       hint="install it with `tpenv manager install`, or see "
                            f"`kubectl -n {namespace} get pods -l {MANAGER_SELECTOR}`")
    ready.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)
    return ready[0]["metadata"]["name"]


async def relay_material(kube: Kube, namespace: str = NAMESPACE) -> dict[str, bytes]:
    """``ca_key`` and ``host_key.pub`` of the relay's Secret tpenv-auth (the manager creates it)."""
    import base64

    try:
        secret = await kube.call(kube.core.read_namespaced_secret, AUTH_SECRET, namespace,
                                 what=What("get", "secrets", namespace, AUTH_SECRET))
    except NotFound as e:
        raise NotFound(f"the relay's Secret {AUTH_SECRET} is missing in namespace {namespace!r}",
                       hint=f"the manager creates it at start: see `kubectl -n {namespace} logs "
                            "deployment/tpenv-manager`") from e
    data = secret.get("data") or {}
    missing = [k for k in ("ca_key", "host_key.pub") if k not in data]
    if missing:
        raise PermanentError(f"Secret {AUTH_SECRET} in namespace {namespace!r} lacks {', '.join(missing)}",
                             hint=f"delete it and {RESTART}")
    return {k: base64.b64decode(data[k]) for k in ("ca_key", "host_key.pub")}


class RelaySession(JsonChannelSession):
    """One SSH connection to the manager's relay; ``async with``, ``close()`` safe twice."""

    def __init__(self, kube: Kube | None = None, *, session_id: str | None = None, namespace: str = NAMESPACE,
                 port: int = RELAY_PORT, connect_timeout: float = CONNECT_TIMEOUT, lookup_timeout: float = 15.0,
                 material: dict[str, bytes] | None = None, tunnel: Any = None, host: str = "127.0.0.1") -> None:
        """``kube``: where to find the manager. ``material`` (``ca_key``, ``host_key.pub``) and
        ``tunnel`` (anything asyncssh takes as ``tunnel=``, with ``host``) replace the Secret and
        the port-forward: tests dial a local relay with them."""
        self.session_id = session_id or f"relay-{secrets.token_hex(4)}"
        if ":" in self.session_id:
            raise UsageError(f"bad session id {self.session_id!r}: it may not contain ':'")
        if kube is None and material is None:
            raise UsageError("RelaySession needs a Kube to find the manager, or material= and a host/port")
        super().__init__(unit_logger("relay", self.session_id), what="relay session",
                         eof_why="the relay closed the resolve channel")
        self.kube, self.namespace, self.port = kube, namespace, port
        self.pod: str | None = None
        self._material, self._tunnel, self._host = material, tunnel, host
        self._own_tunnel: PodTunnel | None = None
        self._connect_timeout, self._lookup_timeout = connect_timeout, lookup_timeout

    # --- lifecycle (the rest: JsonChannelSession) --------------------------------------
    async def connect(self) -> None:
        material, tunnel, host = self._material, self._tunnel, self._host
        if tunnel is None and self.kube is not None:
            self.pod = await find_manager_pod(self.kube, self.namespace)
            tunnel = self._own_tunnel = PodTunnel(self.kube, self.namespace, self.pod)
            host = self.pod
        if material is None:
            assert self.kube is not None
            material = await relay_material(self.kube, self.namespace)
        try:
            self._conn = await open_ssh(self.session_id, ca_key=material["ca_key"], host_key=material["host_key.pub"],
                                        host=host, port=self.port, tunnel=tunnel, timeout=self._connect_timeout,
                                        peer="the relay", restart=RESTART)
            await self._open_channel(SUBSYSTEM, f"the relay refused its {SUBSYSTEM} channel")
        except BaseException:
            self.close()
            raise
        self.log.info("connected to the relay in pod %s", self.pod or f"{host}:{self.port}")

    def close(self) -> None:
        """End the session and every connection opened through it. Safe to call twice."""
        super().close()
        if self._own_tunnel is not None:
            self._own_tunnel.close()

    async def wait_closed(self) -> None:
        await super().wait_closed()
        if self._own_tunnel is not None:
            await self._own_tunnel.wait_closed()

    # --- direct-tcpip ------------------------------------------------------------------
    async def open_connection(self, host: str, port: int) -> tuple[asyncssh.SSHReader, asyncssh.SSHWriter]:
        """A TCP connection from the manager pod to ``host:port`` (a cluster address, or a name
        the manager resolves with cluster DNS). Forbidden when the relay refuses the destination,
        NotFound for an unknown name, TransientError when the destination does not answer."""
        if self._conn is None or self.closed.is_set():
            raise TunnelDropped("the relay session is closed")
        try:
            return await self._conn.open_connection(host, port, **CHANNEL_OPTIONS)
        except asyncssh.ChannelOpenError as e:
            reason = e.reason or "no reason given"
            if e.code == OPEN_ADMINISTRATIVELY_PROHIBITED:
                raise Forbidden(f"the relay refused {host}:{port}: {reason}",
                                hint="the relay reaches the cluster's pod and service addresses only") from e
            if "no such name" in reason:
                raise NotFound(f"cannot connect to {host}:{port}: {reason}") from e
            raise TransientError(f"the relay could not connect to {host}:{port}: {reason}") from e
        except (OSError, asyncssh.Error) as e:
            self._lost(type(e).__name__)
            raise TunnelDropped(f"the relay session broke: {e}") from e

    # --- tpenv-resolve -----------------------------------------------------------------
    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request/answer on the resolve channel; errors mapped to tpenv.errors."""
        try:
            answer = await self._exchange(op, fields, self._lookup_timeout)
        except asyncio.TimeoutError as e:
            raise TransientError(f"the relay did not answer {op} within {self._lookup_timeout:g}s") from e
        if answer.get("ok"):
            return {k: v for k, v in answer.items() if k not in ("id", "ok")}
        err = answer.get("error") or {}
        message = f"relay: {err.get('message', 'unknown error')}"
        if err.get("code") == "not-found":
            raise NotFound(message)
        if err.get("code") == "bad-request":
            raise UsageError(message)
        raise TransientError(message)

    async def resolve(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        """``{"name", "addresses", "cname"}`` for ``name`` as the cluster sees it; a bare name with
        ``namespace`` is that namespace's Service first. NotFound when no such name exists."""
        fields: dict[str, Any] = {"name": name}
        if namespace:
            fields["namespace"] = namespace
        return await self.request("resolve", **fields)

    async def info(self) -> dict[str, Any]:
        """``{"ranges", "domain", "nameservers"}``: the relay's allowed ranges, the cluster domain
        and the cluster DNS as the manager pod sees them (its resolv.conf)."""
        return await self.request("info")

    async def ping(self) -> float:
        """The relay's clock (seconds since the epoch): proves the session is alive."""
        return float((await self.request("ping"))["time"])


__all__ = ["RelaySession", "find_manager_pod", "relay_material", "NAMESPACE", "RELAY_PORT"]
