"""Async streaming port-forward over the API server's ``pods/<name>/portforward`` WebSocket.

The wire format (verified against kubelet ``pkg/cri/streaming/portforward/websocket.go`` and
apimachinery ``wsstream/conn.go``): the client asks for subprotocol ``v4.channel.k8s.io`` and
``?ports=P``; the API server proxies the upgrade to the kubelet, which opens, for each port,
a data channel (0) and an error channel (1). Every binary message starts with its channel byte.
The first message the server sends on each channel is the port as 2 bytes little-endian. The
client writes ``0x00 + bytes`` to send. When the pod side fails (nothing listens, pod gone) the
kubelet writes the reason on the error channel and closes the WebSocket; v4 has no half-close.

One WebSocket carries one TCP stream, so there is no multiplexing to get wrong and no thread:
each stream is an asyncio Transport (:class:`PortForwardTransport`) over tpenv's own RFC 6455
client (:mod:`tpenv.kits.ws_client`: TLS decrypts into the frame parser's buffer, the data
reaches the protocol in one copy per read, writes of a loop pass share a frame; no task or
future per message. The ``websockets`` library's client, used before, cost 2-3x the CPU per
byte: bench/ws_loopback.py). It fits both ``asyncio.StreamReader``/``StreamWriter`` (:meth:`PodTunnel.open_stream`)
and asyncssh (``asyncssh.connect(..., tunnel=PodTunnel(kube, ns, pod))``).

A dropped stream surfaces at once as :class:`~tpenv.errors.TunnelDropped` carrying the
kubelet's error text (``connection_lost(exc)`` on the protocol).

WebSocket first, SPDY as the fallback (``TPENV_PORTFORWARD_PROTOCOL=auto``, the default):
older API servers, some proxies and managed clusters refuse the WebSocket upgrade for
port-forward (kube < 1.30, or the ``PortForwardWebsockets`` gate off) and kubectl then
speaks SPDY/3.1. :class:`PodTunnel` does the same: when the API server answers the
WebSocket handshake with an HTTP status that refuses the *upgrade* (400, 426, 405, 501, or
a 403 whose text is about the upgrade or protocol negotiation; see :func:`upgrade_refused`)
it switches to :mod:`tpenv.kits.spdy`, remembers the choice for that API server (every later
tunnel to it goes straight to SPDY) and logs it once at info level. A 404 (no such pod) and
an RBAC 403 stay errors. ``websocket`` or ``spdy`` forces one protocol. The transport handed
to asyncssh or a StreamReader behaves the same either way; with SPDY one session (one TLS
connection, one upgrade) carries every stream the tunnel opens.

Isolated connections (:meth:`PodTunnel.isolated`: the parked streams that carry intercepted
connections, most of an intercept's bytes) are the other way round under ``auto``: SPDY first, on a
session of their own, WebSocket when this API server refuses SPDY (remembered likewise; a
kubeconfig ``proxy-url`` goes to WebSocket at once). The kubelet's WebSocket port-forward ends
in ``golang.org/x/net/websocket``, which unmasks every byte a client sends in a loop of its
own, one byte at a time: with WebSocket the container runtime's one goroutine per stream was
what bounded an intercept's laptop-to-cluster bulk (docs/performance.md). SPDY frames need no
unmasking; a session per connection keeps a bulk transfer from queueing another connection's
small answers behind it (head-of-line), as one WebSocket per stream did. (The agent's SSH
connection stays on WebSocket: the many small packets of its channels fare better with the
WebSocket client's coalesced writes; docs/design.md.)
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable, Protocol
from urllib.parse import quote

from tpenv.errors import ClusterUnreachable, TunnelDropped
from tpenv.kits import spdy
from tpenv.kits.pf_common import (PortForwardTransportBase, PortNotListening, WebSocketRefused, api_refusal,
                                  pod_side_error, status_message, tls_kwargs, upgrade_refused)
from tpenv.kits.ws_client import UpgradeRefused, WsConnection
from tpenv.kits.ws_frames import WebSocketProtocolError

log = logging.getLogger("tpenv.portforward")

SUBPROTOCOL = "v4.channel.k8s.io"
DATA, ERROR = 0, 1
_MAX_FRAME = 64 * 1024  # payload per outgoing message: big enough to stream, small enough to interleave


class KubeAccess(Protocol):
    """What the transport needs from :class:`tpenv.kits.kube.Kube` (host, credentials, TLS)."""

    host: str

    def auth_headers(self) -> dict[str, str]: ...

    def ssl_context(self) -> Any: ...

    @property
    def tls_server_name(self) -> str | None: ...


def portforward_url(host: str, namespace: str, pod: str, port: int) -> str:
    base = host.rstrip("/")
    scheme = "wss" if base.startswith("https") else "ws"
    base = scheme + base[base.index(":"):]
    return f"{base}/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}/portforward?ports={port}"


async def open_websocket(kube: KubeAccess, namespace: str, pod: str, port: int,
                         *, open_timeout: float = 15.0) -> WsConnection:
    """Upgrade to the port-forward WebSocket; HTTP refusals become NotFound/Forbidden/TunnelDropped."""
    url = portforward_url(kube.host, namespace, pod, port)
    what = f"port-forward to pod {pod!r} port {port} in namespace {namespace!r}"
    try:
        return await WsConnection.open(
            url, subprotocol=SUBPROTOCOL, headers=kube.auth_headers(),
            # The kubeconfig's proxy-url, not the environment, says how to reach the API server.
            proxy=getattr(kube, "proxy", None), open_timeout=open_timeout,
            name=f"{namespace}/{pod}:{port}", prefix=bytes([DATA]), max_frame=_MAX_FRAME, **tls_kwargs(kube))
    except UpgradeRefused as e:
        body = e.body.decode("utf-8", "replace").strip()
        text = status_message(body) or f"HTTP {e.status}"
        if upgrade_refused(e.status, body):
            raise WebSocketRefused(e.status, f"{what}: the API server refused the WebSocket upgrade "
                                             f"(HTTP {e.status}: {text})") from e
        raise (api_refusal(what, namespace, e.status, text) or pod_side_error(what, f"refused ({text})")) from e
    except (OSError, TimeoutError, WebSocketProtocolError) as e:
        raise ClusterUnreachable(f"{what}: cannot reach the API server ({e.__class__.__name__}: {e})") from e


class PortForwardTransport(PortForwardTransportBase):
    """One port-forwarded TCP stream as an asyncio Transport over one WebSocket (:class:`WsConnection`).

    The WebSocket hands over each read's message bytes as pieces (``ws_piece``); here the
    channel byte that starts each message picks data or error, the port that starts each
    channel's first message is dropped, and after the read (``ws_batch_end``) the data pieces
    reach the protocol in one ``data_received``.
    """

    def __init__(self, ws: WsConnection, protocol: asyncio.BaseProtocol, *,
                 name: str, peer: tuple[str, int],
                 on_lost: Callable[["PortForwardTransport"], None] | None = None) -> None:
        super().__init__(protocol, name=name, peer=peer, sockname="portforward", on_lost=on_lost)
        self._ws = ws
        self._reading = True
        self._channel = -1  # of the message whose bytes come now
        self._strip = 0  # bytes of the port still to drop from the front of a channel's first message
        self._seen: set[int] = set()  # channels whose first message (the port) began
        self._pieces: list[memoryview] = []  # data of this read, valid until the next one
        self._error_bytes = bytearray()

    def start(self) -> None:
        """Begin delivering on the next loop pass, after the protocol's connection_made and after
        create_connection has returned, as asyncio's own transports do."""
        self._ws.loop.call_soon(self._ws.start, self)

    # -- asyncio.Transport (the state-only methods: PortForwardTransportBase) ------------------

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        # The WebSocket stops reading the socket: TCP backpressure up to the kubelet.
        self._reading = False
        self._ws.pause_reading()

    def resume_reading(self) -> None:
        self._reading = True
        self._ws.resume_reading()

    def can_write_eof(self) -> bool:
        return False  # v4.channel.k8s.io has no half-close

    def get_write_buffer_size(self) -> int:
        return self._ws.get_write_buffer_size()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or not data:
            return
        self._ws.write(data)

    def close(self) -> None:
        """Send what is buffered, then close the WebSocket (safe to call twice)."""
        if self._closing or self._lost:
            return
        self._closing = True
        self._ws.close()

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        self._ws.abort()

    # -- the WebSocket's handler (tpenv.kits.ws_client.WsHandler) -------------------------------

    def ws_piece(self, first: bool, piece: memoryview) -> None:
        if first:
            self._channel, piece = piece[0], piece[1:]
            self._strip = 0
            if self._channel not in self._seen and self._channel in (DATA, ERROR):
                self._seen.add(self._channel)
                self._strip = 2  # the kubelet's first message on each channel is the port, little-endian
                if len(piece) >= 2:
                    log.debug("[portforward/%s] channel %d open for port %d", self._name, self._channel,
                              int.from_bytes(piece[:2], "little"))
        if self._strip:
            cut = min(self._strip, len(piece))
            self._strip -= cut
            piece = piece[cut:]
        if not piece:
            return
        if self._channel == DATA:
            if not self._closing:  # like a socket transport: no data_received after close()
                self._pieces.append(piece)
        elif self._channel == ERROR:
            self._error_bytes += piece

    def ws_batch_end(self) -> None:
        if self._pieces:
            pieces, self._pieces = self._pieces, []
            self._protocol.data_received(bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces))  # type: ignore[attr-defined]

    def ws_pause_writing(self) -> None:
        if not self._writing_paused:
            self._writing_paused = True
            self._protocol.pause_writing()

    def ws_resume_writing(self) -> None:
        if self._writing_paused:
            self._writing_paused = False
            self._protocol.resume_writing()

    def ws_closed(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._pieces = []
        if self._error_bytes:
            self._error_text = self._error_bytes.decode("utf-8", "replace")
            err: BaseException | None = pod_side_error(f"port-forward {self._name}", self._error_text.strip())
        elif exc is not None:
            err = TunnelDropped(f"port-forward {self._name}: {exc}")
            err.__cause__ = exc
        else:
            err = None
        if err is not None:
            log.debug("[portforward/%s] dropped: %s", self._name, err)
        elif not self._closing:
            # The pod side ended the stream cleanly: tell the protocol like a TCP FIN.
            try:
                self._protocol.eof_received()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - a protocol's bug must not hide the close
                log.exception("[portforward/%s] eof_received failed", self._name)
        if self._on_lost is not None:
            self._on_lost(self)
        self._protocol.connection_lost(err)

    async def wait_closed(self) -> None:
        await self._ws.wait_closed()


PROTOCOLS = ("auto", "websocket", "spdy")
_ENV = "TPENV_PORTFORWARD_PROTOCOL"
# API servers that refused the WebSocket upgrade, by (host, proxy): their tunnels go straight to SPDY.
_refused_websocket: dict[tuple[str, str | None], str] = {}
_refused_spdy: dict[tuple[str, str | None], str] = {}  # API servers that refused SPDY (isolated connections)


def configured_protocol(env: Any = None) -> str:
    """``TPENV_PORTFORWARD_PROTOCOL`` checked by the settings model (auto when unset)."""
    from tpenv.settings import load_settings

    env = os.environ if env is None else env
    return load_settings({k: v for k, v in env.items() if k == _ENV}).portforward.protocol


def _server_key(kube: KubeAccess) -> tuple[str, str | None]:
    return kube.host.rstrip("/"), getattr(kube, "proxy", None)


def _remember(table: dict[tuple[str, str | None], str], kube: KubeAccess, why: str, refused: str,
              instead: str) -> None:
    key = _server_key(kube)
    if key not in table:
        table[key] = why
        log.info("the API server at %s refused the %s port-forward (%s); %s from now on", key[0], refused, why,
                 instead)


def remember_refusal(kube: KubeAccess, why: str) -> None:
    """Note that this API server refuses WebSocket port-forward (logged once per server)."""
    _remember(_refused_websocket, kube, why, "WebSocket", "using SPDY/3.1 for its port-forwards")


def remember_spdy_refusal(kube: KubeAccess, why: str) -> None:
    """Note that this API server refuses SPDY port-forward (logged once per server)."""
    _remember(_refused_spdy, kube, why, "SPDY", "isolated connections use WebSocket")


class IsolatedTunnel:
    """A :class:`PodTunnel` for connections that must not share a pipe with others (see the module
    docstring), with the same ``create_connection``; the tunnel owns what it opens."""

    def __init__(self, tunnel: "PodTunnel") -> None:
        self.tunnel = tunnel
        self.logger = tunnel.logger

    def __repr__(self) -> str:
        return repr(self.tunnel)

    async def create_connection(self, protocol_factory: Callable[[], asyncio.BaseProtocol],
                                host: str, port: int) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        return await self.tunnel.create_connection(protocol_factory, host, port, isolated=True)


class PodTunnel:
    """Port-forward streams to one pod; also an asyncssh ``tunnel`` (``create_connection``).

    ``host`` given to create_connection is ignored (the pod is fixed); ``port`` is the pod port.
    ``protocol`` is auto/websocket/spdy (default: ``TPENV_PORTFORWARD_PROTOCOL``, else auto).
    With SPDY the tunnel keeps one session for all its streams; it closes itself when idle.
    """

    def __init__(self, kube: KubeAccess, namespace: str, pod: str, *, protocol: str | None = None,
                 open_timeout: float = 15.0) -> None:
        self.kube = kube
        self.namespace = namespace
        self.pod = pod
        self.protocol = protocol or configured_protocol()
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"port-forward protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        self.open_timeout = open_timeout
        self.logger = log  # asyncssh logs "via <tunnel>" with this
        self._transports: set[asyncio.Transport] = set()
        self._session: spdy.SpdySession | None = None
        self._sessions: set[spdy.SpdySession] = set()
        self._session_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"PodTunnel({self.namespace}/{self.pod})"

    @property
    def uses_spdy(self) -> bool:
        """What the next stream will use: SPDY when forced or when this API server refused WebSocket."""
        return self.protocol == "spdy" or (self.protocol == "auto" and _server_key(self.kube) in _refused_websocket)

    def isolated(self) -> IsolatedTunnel:
        """This tunnel for connections that get a pipe of their own (module docstring)."""
        return IsolatedTunnel(self)

    def _isolated_spdy(self) -> bool:
        if self.protocol != "auto":
            return self.protocol == "spdy"
        return _server_key(self.kube) not in _refused_spdy and not getattr(self.kube, "proxy", None)

    async def create_connection(self, protocol_factory: Callable[[], asyncio.BaseProtocol],
                                host: str, port: int, *, isolated: bool = False,
                                ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """A stream to ``port`` in the pod (``host`` is ignored). ``isolated``: SPDY first, on a
        session of its own (see the module docstring)."""
        name, peer = f"{self.namespace}/{self.pod}:{port}", (f"{self.pod}.{self.namespace}", port)
        if isolated:
            if self._isolated_spdy():
                try:
                    return await self._own_session(protocol_factory, port, name, peer)
                except spdy.SpdyRefused as e:
                    if self.protocol != "auto":
                        raise
                    remember_spdy_refusal(self.kube, str(e))
            return await self._websocket(protocol_factory, port, name, peer)
        if not self.uses_spdy:
            try:
                return await self._websocket(protocol_factory, port, name, peer)
            except WebSocketRefused as e:
                if self.protocol != "auto":
                    raise
                remember_refusal(self.kube, f"HTTP {e.status}")
        session = await self._spdy_session()
        transport, protocol = await spdy.open_portforward(
            session, protocol_factory, port, name=name, peer=peer, open_timeout=self.open_timeout,
            on_lost=self._transports.discard)
        if not transport.is_closing():
            self._transports.add(transport)
        return transport, protocol

    async def _websocket(self, protocol_factory: Callable[[], asyncio.BaseProtocol], port: int, name: str,
                         peer: tuple[str, int]) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        ws = await open_websocket(self.kube, self.namespace, self.pod, port, open_timeout=self.open_timeout)
        protocol = protocol_factory()
        transport = PortForwardTransport(ws, protocol, name=name, peer=peer, on_lost=self._transports.discard)
        self._transports.add(transport)
        protocol.connection_made(transport)
        transport.start()
        return transport, protocol

    async def _own_session(self, protocol_factory: Callable[[], asyncio.BaseProtocol], port: int, name: str,
                           peer: tuple[str, int]) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """One stream on a SPDY session of its own, which closes once the stream has ended."""
        session = await self._new_session(idle_timeout=0.0)
        try:
            transport, protocol = await spdy.open_portforward(
                session, protocol_factory, port, name=name, peer=peer, open_timeout=self.open_timeout,
                on_lost=self._transports.discard)
        except BaseException:
            session.abort()
            raise
        if not transport.is_closing():
            self._transports.add(transport)
        return transport, protocol

    async def _spdy_session(self) -> spdy.SpdySession:
        """This tunnel's SPDY session; a new one when there is none or it is closing (GOAWAY, idle, lost)."""
        if self._session_lock is None:
            self._session_lock = asyncio.Lock()
        async with self._session_lock:
            if self._session is None or not self._session.usable:
                self._session = await self._new_session()
            return self._session

    async def _new_session(self, **kw: Any) -> spdy.SpdySession:
        """A SPDY session to the pod, kept in ``_sessions`` (closed ones dropped) for close()."""
        self._sessions = {s for s in self._sessions if not s.closed.is_set()}
        session = await spdy.SpdySession.connect(self.kube, self.namespace, self.pod,
                                                 open_timeout=self.open_timeout, **kw)
        self._sessions.add(session)
        return session

    async def open_stream(self, port: int, *, limit: int = 2 ** 16,
                          isolated: bool = False) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A plain (reader, writer) pair to ``port`` in the pod (``isolated``: see create_connection)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await self.create_connection(lambda: protocol, self.pod, port, isolated=isolated)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return reader, writer

    def close(self) -> None:
        """Close every stream this tunnel opened, then its SPDY session (safe twice)."""
        for t in list(self._transports):
            t.close()
        for s in list(self._sessions):
            s.close()
        self._session = None

    async def wait_closed(self) -> None:
        for t in list(self._transports):
            await t.wait_closed()  # type: ignore[attr-defined]
        for s in list(self._sessions):
            await s.wait_closed()
            self._sessions.discard(s)


class _Greeting(asyncio.Protocol):
    """The first bytes of a stream, or how it ended before any came."""

    def __init__(self) -> None:
        self.result: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.result.done():
            self.result.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.result.done():
            self.result.set_result(exc or TunnelDropped("the pod side closed the stream before any byte"))


async def wait_greeting(tunnel: PodTunnel, port: int, *, timeout: float, every: float = 0.05,
                        steady: float = 2.0, most: float = 1.0) -> None:
    """Until ``port`` in the tunnel's pod accepts a stream and speaks first (an SSH server's
    banner). A refusal (:class:`PortNotListening`: no sandbox yet, or nothing listens yet) is
    tried again every ``every`` seconds for ``steady`` seconds, then after doubling delays up
    to ``most``; any other failure is raised, and :class:`TunnelDropped` after ``timeout``.

    Why a retry and not an event: a container's process listens up to a second before the
    kubelet's next relist tells the API server it runs, and nothing else says so. A refused
    stream costs one round trip to the kubelet (about 10 ms); the delays after ``steady``
    bound what a pod that does not start (an image pull, a crash loop) costs it."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline, delay = start + timeout, every
    while True:
        transport: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.001)):
                try:
                    transport, greeting = await tunnel.create_connection(_Greeting, tunnel.pod, port)
                except PortNotListening as e:  # the upgrade refused: no sandbox yet
                    exc: BaseException | None = e
                else:
                    exc = await greeting.result
        except TimeoutError as e:
            raise TunnelDropped(f"nothing answered on port {port} of pod {tunnel.pod} within {timeout:.0f}s") from e
        finally:
            if transport is not None:
                transport.close()
        if exc is None:
            return
        if not isinstance(exc, PortNotListening):
            raise exc
        if loop.time() + delay >= deadline:
            raise TunnelDropped(f"nothing listens on port {port} of pod {tunnel.pod} after {timeout:.0f}s") from exc
        await asyncio.sleep(delay)
        if loop.time() - start >= steady:
            delay = min(delay * 2, most)
