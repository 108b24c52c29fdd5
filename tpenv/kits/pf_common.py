"""What the two port-forward transports share: the plain asyncio.Transport parts and the API server's refusals.

A port-forwarded TCP stream is an asyncio Transport over WebSocket
(:class:`tpenv.kits.portforward.PortForwardTransport`) or, as the fallback, over SPDY/3.1
(:class:`tpenv.kits.spdy.SpdyPortForwardTransport`). How each moves bytes differs; the rest
is the same and lives here once: the Transport methods that only hold state
(:class:`PortForwardTransportBase`), the write-buffer marks that pause and resume the
protocol, the ``message`` of a Kubernetes Status body, and what a 404 / 401 / 403 answer to
the upgrade means (:func:`api_refusal`), and which answers refuse the WebSocket upgrade itself
(:func:`upgrade_refused`, :class:`WebSocketRefused`: SPDY may still work), what the pod side
said on a stream's error channel (:func:`pod_side_error`, :class:`PortNotListening`), and the incremental
reader of the HTTP answer to either upgrade (:class:`UpgradeAnswer`). This module imports neither transport, so both (and
:mod:`tpenv.kits.spdy_upgrade`) can import it without a cycle.
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Callable

from tpenv.errors import Forbidden, NotFound, TunnelDropped

_MAX_HEAD = 64 * 1024  # an answer's head longer than this is not an API server's
HIGH_WATER = 1024 * 1024  # per stream transport: pause the protocol's writing above this many buffered bytes
LOW_WATER = 256 * 1024  # ... and resume it at or below this many


def status_message(body: str) -> str:
    """The ``message`` of a Kubernetes Status JSON body, or the body itself (its first 300 characters)."""
    try:
        data = json.loads(body)
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
    except ValueError:
        pass
    return body[:300]


def api_refusal(what: str, namespace: str, status: int, text: str) -> Exception | None:
    """The error for an API server's 404 (NotFound) or 401/403 (Forbidden) answer to a port-forward
    upgrade; None for any other status (each transport words those itself). ``text`` is the
    answer's :func:`status_message` (or ``HTTP <status>``)."""
    if status == 404:
        return NotFound(f"{what}: {text}", hint="is the pod still there? `kubectl get pods` shows it")
    if status in (401, 403):
        return Forbidden(f"forbidden: cannot {what} ({text})",
                         hint=f"check with: kubectl auth can-i create pods/portforward -n {namespace}")
    return None


class PortNotListening(TunnelDropped):
    """Nothing listens on the pod's port yet: the kubelet refused the stream's connection, or
    has no sandbox for the pod yet (it is still being created). A pod still starting says
    this; :func:`tpenv.kits.portforward.wait_greeting` waits it out."""


# The kubelet's (or the CRI's) words for "not yet": nothing listens on the port
# (``... connect: connection refused``), no sandbox for the pod (``pod not found ("NAME_NS")``).
_NOT_YET = ("connection refused", "pod not found")


def pod_side_error(what: str, text: str) -> TunnelDropped:
    """The error for the kubelet's refusal of a stream, written on its error channel or as the
    upgrade's answer: :class:`PortNotListening` for "not yet", else why it failed (pod gone,
    netns missing...)."""
    cls = PortNotListening if any(s in text for s in _NOT_YET) else TunnelDropped
    return cls(f"{what}: {text}")


class WebSocketRefused(TunnelDropped):
    """The API server (or a proxy) answered the WebSocket upgrade with a status that refuses the
    upgrade itself, not the request: SPDY may still work."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, hint="set TPENV_PORTFORWARD_PROTOCOL=spdy (or auto) to use SPDY/3.1 instead")
        self.status = status


# Statuses that refuse the upgrade, whatever the body: 400 (the API server's "Upgrade request
# required", the kubelet's "unable to upgrade: missing upgrade headers"), 405 and 501 (a
# server or proxy without WebSocket for this path), 426 Upgrade Required.
_UPGRADE_STATUSES = frozenset({400, 405, 426, 501})
_UPGRADE_WORDS = re.compile(r"upgrade|websocket|negotiate|protocol|spdy", re.IGNORECASE)
_RBAC_WORDS = re.compile(r"is forbidden:|cannot create resource|\bUser \"", re.IGNORECASE)


def upgrade_refused(status: int, body: str) -> bool:
    """Whether an HTTP answer to the WebSocket handshake refuses the upgrade (fall back to SPDY).

    A 403 is ambiguous: RBAC says ``pods "x" is forbidden: User "u" cannot create resource
    "pods/portforward"`` (an error, SPDY would get the same), while apimachinery's handshake
    says ``unable to upgrade: unable to negotiate protocol`` (fall back). 404 and 401 never
    fall back, nor do 5xx answers other than 501.
    """
    if status in _UPGRADE_STATUSES:
        return True
    if status == 403:
        text = status_message(body)
        reason = ""
        try:
            reason = str((json.loads(body) or {}).get("reason") or "")
        except (ValueError, AttributeError):
            pass
        if reason == "Forbidden" or _RBAC_WORDS.search(text):
            return False
        return bool(_UPGRADE_WORDS.search(text))
    return False


class PortForwardTransportBase(asyncio.Transport):
    """The state-only parts of a port-forwarded stream's Transport (extra info, protocol, closing).

    Subclasses keep ``_closing`` (close() was called) and ``_lost`` (connection_lost is due or
    done) current, move the bytes, and call :meth:`_pause_writing_above` /
    :meth:`_resume_writing_below` with their buffered byte count.
    """

    def __init__(self, protocol: asyncio.BaseProtocol, *, name: str, peer: tuple[str, int], sockname: str,
                 on_lost: Callable[[Any], None] | None = None) -> None:
        super().__init__()
        self._protocol = protocol
        self._name = name
        self._on_lost = on_lost
        self._extra = {"peername": peer, "sockname": (sockname, 0)}
        self._closing = False
        self._lost = False
        self._writing_paused = False
        self._error_text = ""  # what the pod side said on the error channel / stream

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def _pause_writing_above(self, buffered: int) -> None:
        if not self._writing_paused and buffered > HIGH_WATER:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _resume_writing_below(self, buffered: int) -> None:
        if self._writing_paused and buffered <= LOW_WATER:
            self._writing_paused = False
            self._protocol.resume_writing()


class UpgradeAnswer:
    """The HTTP answer to the upgrade, fed as it arrives until its head (and a refusal's body) is whole."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self._buf = bytearray()  # the head so far; once it is parsed, a refusal's body
        self._body_len: int | None = None

    def feed(self, data: bytes) -> bytes:
        """Take bytes of the answer; return those after a 101's head (the first frames).

        Raises ConnectionResetError when the bytes are not an HTTP answer.
        """
        self._buf += data
        if self.status is not None:
            return b""
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_HEAD:
                raise ConnectionResetError("the HTTP answer's head is too long")
            return b""
        lines = self._buf[:end].decode("latin-1").split("\r\n")
        rest = bytes(self._buf[end + 4:])
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError) as e:
            raise ConnectionResetError(f"not an HTTP answer: {lines[0][:80]!r}") from e
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.status = status
        self._buf = bytearray(rest)
        if status == 101:
            return rest
        if self.headers.get("content-length", "").isdigit():
            self._body_len = int(self.headers["content-length"])
        return b""

    def refused(self, *, at_close: bool = False) -> tuple[int, dict[str, str], bytes] | None:
        """(status, headers, body) of a refusal once its body is whole (or, ``at_close``, ran to the close)."""
        if self.status is None or self.status == 101:
            return None
        if at_close:
            return self.status, self.headers, bytes(self._buf)
        if self._body_len is not None and len(self._buf) >= self._body_len:
            return self.status, self.headers, bytes(self._buf[:self._body_len])
        return None


__all__ = ["HIGH_WATER", "UpgradeAnswer", "LOW_WATER", "PortForwardTransportBase", "api_refusal", "status_message", "tls_kwargs"]


def tls_kwargs(kube: Any) -> dict[str, Any]:
    """The ``ssl``/``server_hostname`` arguments of a WebSocket to the API server (port-forward,
    exec): the kubeconfig's CA and client certificate, and its tls-server-name when it has one."""
    kw: dict[str, Any] = {}
    ctx = kube.ssl_context()
    if ctx is not None:
        kw["ssl"] = ctx
        if kube.tls_server_name:
            kw["server_hostname"] = kube.tls_server_name
    return kw
