"""The HTTP/1.1 upgrade that opens a SPDY/3.1 port-forward session, and what its refusals mean.

kubectl (client-go ``tools/portforward`` over apimachinery ``httpstream/spdy``) sends
``POST .../pods/<pod>/portforward`` with ``Connection: Upgrade``, ``Upgrade: SPDY/3.1``,
``X-Stream-Protocol-Version: portforward.k8s.io`` and the kubeconfig's credentials, over TLS;
the answer must be ``101`` naming the same protocol. Anything else is mapped like the
WebSocket path of :mod:`tpenv.kits.portforward` (404 NotFound, 401/403 Forbidden, other
TunnelDropped). Here are the request's bytes and that mapping (the incremental reader of the
answer, shared with the WebSocket client, is :class:`tpenv.kits.pf_common.UpgradeAnswer`); no I/O, so the session
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


class SpdyRefused(TunnelDropped):
    """The API server (or a proxy before it) did not switch to SPDY/3.1 port-forward, and not for
    a reason of the request (404, RBAC): WebSocket may still work."""


def refusal(what: str, namespace: str, status: int, headers: dict[str, str], body: bytes) -> Exception | None:
    """The error for an answer that did not switch to SPDY/3.1 port-forward; None for a good 101."""
    if status != 101:
        text = status_message(body.decode("utf-8", "replace").strip()) or f"HTTP {status}"
        return api_refusal(what, namespace, status, text) or SpdyRefused(f"{what}: refused (HTTP {status}: {text})")
    if headers.get("x-stream-protocol-version") != PORTFORWARD_PROTOCOL \
            or "spdy/3.1" not in headers.get("upgrade", "").lower():
        return SpdyRefused(f"{what}: the server switched to {headers.get('upgrade')!r} / "
                           f"{headers.get('x-stream-protocol-version')!r}, not SPDY/3.1 / {PORTFORWARD_PROTOCOL}")
    return None
