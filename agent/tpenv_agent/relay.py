"""The manager's outbound relay (docs/protocol.md §7): SSH ``direct-tcpip`` to cluster addresses
and name lookups, for developer machines (``tpenv connect``, ``tpenv.kits.relay_client``).

This module holds the SSH server and its ``direct-tcpip`` side; which addresses may be dialled is
:mod:`tpenv_agent.relay_policy`, the ``tpenv-resolve`` subsystem is :mod:`tpenv_agent.relay_resolve`.

An asyncssh server on the manager pod's loopback, reached through the API server's
``pods/portforward`` like the sidecar's SSH port. Login exactly as protocol §2 (the pieces are
shared with the sidecar, :mod:`tpenv_agent.sshd`): user certificates signed by the CA of Secret
``tpenv-auth`` in the manager's namespace, principal = session id = SSH user name.

What an authenticated client may do, and nothing else:

- ``direct-tcpip`` to a destination whose address the :class:`~tpenv_agent.relay_policy.Policy`
  allows: inside the cluster's pod or service ranges, never the manager pod's own loopback,
  link-local or pod addresses, nor a node's address. A host name is resolved here (cluster DNS)
  and only its allowed addresses are dialled, so the check and the connection see the same
  address. Refusals are an SSH open failure whose reason starts with ``relay:``; no packet is
  sent to a refused destination.
- the ``tpenv-resolve`` subsystem: newline-delimited JSON (protocol §3's framing), ops
  ``resolve`` and ``ping``.

Shells, exec, other subsystems, ``tcpip-forward``, agent and X11 forwarding are refused.
Bounded: a cap on open channels per connection, timeouts on lookups and connects, a cap on
lookups in flight per channel, SSH keepalives. Logs are per connection (``[relay/<session>]``)
and name destinations, never key material.
"""
from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import asyncssh
from asyncssh.constants import OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_CONNECT_FAILED, OPEN_RESOURCE_SHORTAGE

from . import log as logs
from .relay_resolve import LookupFailed, LookupNotFound, Resolver, ResolveSession, SystemResolver
from .sshd import SERVER_OPTIONS, CertOnlyServer
from .sshtuning import CHANNEL_OPTIONS

DEFAULT_LISTEN = "127.0.0.1:8022"
MAX_CHANNELS = 64  # per SSH connection: direct-tcpip and resolve channels together
CONNECT_TIMEOUT = 10.0


@dataclass
class Relay:
    """The relay server; ``async with`` starts it on ``listen`` (port 0: any) and closes it."""

    host_key: Any
    authorized: Any
    policy: Any  # StaticPolicy | ApiPolicy: async current(refresh=False) -> Policy
    resolver: Resolver = field(default_factory=SystemResolver)
    domain: str = "cluster.local"
    nameservers: list[str] = field(default_factory=list)  # the pod's resolv.conf: the cluster DNS (op info)
    max_channels: int = MAX_CHANNELS
    connect_timeout: float = CONNECT_TIMEOUT
    conns: set["RelayConn"] = field(default_factory=set)
    _server: Any = None
    _closed: bool = False

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncssh.create_server(
            lambda: RelayConn(self), host, port,
            server_host_keys=[self.host_key],
            authorized_client_keys=self.authorized,
            allow_scp=False,
            encoding=None,
            **SERVER_OPTIONS,
        )
        return self._server.sockets[0].getsockname()[1]

    async def __aenter__(self) -> "Relay":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()

    def close(self) -> None:
        """Stop listening and drop every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for c in list(self.conns):
            if c.conn is not None:
                c.conn.close()
        if isinstance(self.resolver, SystemResolver):
            self.resolver.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
        for c in list(self.conns):
            if c.conn is not None:
                await c.conn.wait_closed()

    # -- what a channel does -------------------------------------------------------------------

    async def destinations(self, host: str) -> list[str]:
        """The allowed addresses for ``host`` (an address or a name), else ChannelOpenError."""
        try:
            addresses = [str(ipaddress.ip_address(host.strip("[]")))]
        except ValueError:
            try:
                addresses, _ = await self.resolver(host)
            except LookupNotFound:
                raise asyncssh.ChannelOpenError(OPEN_CONNECT_FAILED, f"relay: cannot resolve {host}: no such name") from None
            except LookupFailed as e:
                raise asyncssh.ChannelOpenError(OPEN_CONNECT_FAILED, f"relay: {e}") from None
        policy = await self.policy.current()
        refusals = {a: policy.refusal(ipaddress.ip_address(a)) for a in addresses}
        if all(refusals.values()):  # perhaps a new node or range: look again, rate-limited
            policy = await self.policy.current(refresh=True)
            refusals = {a: policy.refusal(ipaddress.ip_address(a)) for a in addresses}
        allowed = [a for a, why in refusals.items() if why is None]
        if not allowed:
            reason = next(iter(refusals.values()), None) or f"relay: {host} has no address"
            if host not in reason:
                reason = f"{reason} ({host})"
            raise asyncssh.ChannelOpenError(OPEN_ADMINISTRATIVELY_PROHIBITED, reason)
        return allowed


class RelayConn(CertOnlyServer):
    """One client connection: its session, its channels, its log unit."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.conn: Any = None
        self.channels = 0
        self.opened = self.refused = 0
        self.log = logs.unit("relay", "conn")

    def connection_made(self, conn: Any) -> None:
        self.conn = conn
        self.relay.conns.add(self)

    def auth_completed(self) -> None:
        self.log = logs.unit("relay", self.username)
        self.log.info("session connected")

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.conns.discard(self)
        if self.log.extra["unit"] != "[relay/conn]":
            why = f": {type(exc).__name__}: {exc}" if exc else ""
            self.log.info("session disconnected (%d connections opened, %d refused)%s",
                          self.opened, self.refused, why)

    def _take_channel(self) -> None:
        if self.channels >= self.relay.max_channels:
            self.refused += 1
            self.log.warning("channel refused: %d channels open already", self.channels)
            raise asyncssh.ChannelOpenError(OPEN_RESOURCE_SHORTAGE,
                                            f"relay: too many channels on this connection ({self.channels})")
        self.channels += 1

    def _release_when_closed(self, chan: Any) -> None:
        async def release() -> None:
            await chan.wait_closed()
            self.channels -= 1

        asyncio.ensure_future(release())

    # -- direct-tcpip --------------------------------------------------------------------------

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        self._take_channel()
        chan = self.conn.create_tcp_channel(**CHANNEL_OPTIONS)
        self._release_when_closed(chan)
        return chan, self._open(dest_host, dest_port)

    async def _open(self, host: str, port: int) -> Any:
        try:
            if not 0 < port < 65536:
                raise asyncssh.ChannelOpenError(OPEN_CONNECT_FAILED, f"relay: bad port {port}")
            addresses = await self.relay.destinations(host)
        except asyncssh.ChannelOpenError as e:
            self.refused += 1
            self.log.info("to %s:%d refused: %s", host, port, e.reason)
            raise
        last: Exception | None = None
        for address in addresses:
            try:
                session = await asyncio.wait_for(self.conn.forward_connection(address, port), self.relay.connect_timeout)
            except asyncio.TimeoutError:
                last = asyncssh.ChannelOpenError(OPEN_CONNECT_FAILED, f"relay: connecting to {address}:{port} timed out")
            except asyncssh.ChannelOpenError as e:
                last = asyncssh.ChannelOpenError(OPEN_CONNECT_FAILED, f"relay: {address}:{port}: {e.reason}")
            else:
                self.opened += 1
                self.log.info("to %s:%d via %s opened", host, port, address)
                return session
        assert isinstance(last, asyncssh.ChannelOpenError)
        self.log.info("to %s:%d failed: %s", host, port, last.reason)
        raise last

    # -- sessions: the resolve subsystem only --------------------------------------------------

    def session_requested(self) -> Any:
        self._take_channel()
        return ResolveSession(self)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self.log.info("tcpip-forward %s:%d refused: the relay only dials out", listen_host, listen_port)
        return False


__all__ = ["Relay", "RelayConn", "DEFAULT_LISTEN", "MAX_CHANNELS", "CONNECT_TIMEOUT"]
