"""The HTTP/1.1 upgrade that opens a SPDY/3.1 port-forward session, and what its refusals mean.

kubectl (client-go ``tools/portforward`` over apimachinery ``httpstream/spdy``) sends
``POST .../pods/<pod>/portforward`` with ``Connection: Upgrade``, ``Upgrade: SPDY/3.1``,
``X-Stream-Protocol-Version: portforward.k8s.io`` and the kubeconfig's credentials, over TLS;
the answer must be ``101`` naming the same protocol. Anything else is mapped like the
WebSocket path of :mod:`tpenv.kits.portforward` (404 NotFound, 401/403 Forbidden, other
TunnelDropped). Here are the request's bytes, an incremental reader of the answer (the first
frames may come in the same read as a 101's head) and that mapping; no I/O, so the session
(:mod:`tpenv.kits.spdy_session`) reads as SPDY alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from tpenv.errors import ClusterUnreachable, TunnelDropped
from tpenv.kits.pf_common import api_refusal, status_message

if TYPE_CHECKING:
    from tpenv.kits.portforward import KubeAccess

PORTFORWARD_PROTOCOL = "portforward.k8s.io"
_MAX_HEAD = 64 * 1024  # an answer's head longer than this is not an API server's


def upgrade_request(kube: KubeAccess, namespace: str, pod: str,
                    what: str) -> tuple[str | None, int, dict[str, Any], bytes]:
    """Where to connect (host, port, TLS keywords for create_connection) and the request's bytes."""
    if getattr(kube, "proxy", None):
        raise ClusterUnreachable(f"{what}: the kubeconfig's proxy-url is not supported by the SPDY transport",
                                 hint="set TPENV_PORTFORWARD_PROTOCOL=websocket, or reach the API server "
                                      "without a proxy")
    url = urlsplit(kube.host)
    secure = url.scheme == "https"
    port = url.port or (443 if secure else 80)
    path = f"{url.path.rstrip('/')}/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}/portforward"
    ssl_kw: dict[str, Any] = {}
    ctx = kube.ssl_context()
    if ctx is not None:
        ssl_kw = {"ssl": ctx, "server_hostname": kube.tls_server_name or url.hostname}
    head = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}", "Connection: Upgrade", "Upgrade: SPDY/3.1",
            f"X-Stream-Protocol-Version: {PORTFORWARD_PROTOCOL}", "User-Agent: tpenv", "Content-Length: 0"]
    head += [f"{k}: {v}" for k, v in kube.auth_headers().items()]
    return url.hostname, port, ssl_kw, ("\r\n".join(head) + "\r\n\r\n").encode()


def refusal(what: str, namespace: str, status: int, headers: dict[str, str], body: bytes) -> Exception | None:
    """The error for an answer that did not switch to SPDY/3.1 port-forward; None for a good 101."""
    if status != 101:
        text = status_message(body.decode("utf-8", "replace").strip()) or f"HTTP {status}"
        return api_refusal(what, namespace, status, text) or TunnelDropped(f"{what}: refused (HTTP {status}: {text})")
    if headers.get("x-stream-protocol-version") != PORTFORWARD_PROTOCOL \
            or "spdy/3.1" not in headers.get("upgrade", "").lower():
        return TunnelDropped(f"{what}: the server switched to {headers.get('upgrade')!r} / "
                             f"{headers.get('x-stream-protocol-version')!r}, not SPDY/3.1 / {PORTFORWARD_PROTOCOL}")
    return None


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
