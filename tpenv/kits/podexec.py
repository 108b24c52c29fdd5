"""Run a command in a pod's container and read its output: the API server's ``pods/exec`` WebSocket.

The wire format is port-forward's sibling (apimachinery ``wsstream``, subprotocol
``v4.channel.k8s.io``): every binary message starts with its channel byte; 1 is stdout, 2 stderr,
3 the error channel, on which the API server writes a ``Status`` JSON when the command ended
(``Success``, or ``Failure`` with the exit code or the reason the command could not start).
No stdin and no TTY are asked for, so nothing is ever sent but the upgrade.

Used to read what the app process really sees (``/proc/1/environ``), which only the app's own
container can show: variables its image's config sets (``ENV`` in a Dockerfile) are invisible to
the pod spec and to the agent. The right needed is ``create pods/exec``; a refusal is
:class:`~tpenv.errors.Forbidden`, a command that fails is :class:`ExecFailed`, a stream cut before
the command's exit status is :class:`~tpenv.errors.TunnelDropped` (transient: run it again).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote, urlencode

import websockets
from websockets.asyncio.client import connect as ws_connect

from tpenv.errors import ClusterUnreachable, PermanentError, TransientError, TunnelDropped
from tpenv.kits.pf_common import api_refusal, status_message, tls_kwargs
from tpenv.kits.portforward import KubeAccess

SUBPROTOCOL = "v4.channel.k8s.io"
STDOUT, STDERR, ERROR = 1, 2, 3
MAX_OUTPUT = 4 * 1024 * 1024  # an environment is kilobytes; anything bigger is not what we asked for


class ExecFailed(PermanentError):
    """The command ran and failed, or could not start (no such executable in the image)."""


def exec_url(host: str, namespace: str, pod: str, container: str, argv: list[str]) -> str:
    base = host.rstrip("/")
    scheme = "wss" if base.startswith("https") else "ws"
    base = scheme + base[base.index(":"):]
    query = urlencode([("container", container), *(("command", a) for a in argv),
                       ("stdout", "true"), ("stderr", "true")])
    return f"{base}/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}/exec?{query}"


def exec_status(raw: bytes) -> str | None:
    """None when the error channel's Status says Success, else the reason in words."""
    text = raw.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        status: dict[str, Any] = json.loads(text)
    except ValueError:
        return text
    if status.get("status") == "Success":
        return None
    return str(status.get("message") or text)


async def exec_output(kube: KubeAccess, namespace: str, pod: str, container: str, argv: list[str],
                      *, timeout: float = 30.0) -> bytes:
    """The stdout of ``argv`` run in ``container`` of ``pod``; ExecFailed with its stderr otherwise."""
    what = f"exec in container {container!r} of pod {pod!r} in namespace {namespace!r}"
    kw = tls_kwargs(kube)
    url = exec_url(kube.host, namespace, pod, container, argv)
    out, err, status = bytearray(), bytearray(), bytearray()
    try:
        async with asyncio.timeout(timeout):
            async with ws_connect(url, subprotocols=[SUBPROTOCOL], additional_headers=kube.auth_headers(),
                                  compression=None, proxy=getattr(kube, "proxy", None),
                                  open_timeout=timeout, max_size=None, **kw) as ws:
                async for msg in ws:
                    if not isinstance(msg, bytes) or not msg:
                        continue
                    channel, data = msg[0], msg[1:]
                    buf = {STDOUT: out, STDERR: err, ERROR: status}.get(channel)
                    if buf is not None:
                        buf += data
                    if len(out) > MAX_OUTPUT:
                        raise ExecFailed(f"{what}: more than {MAX_OUTPUT} bytes of output")
    except websockets.InvalidStatus as e:
        code = e.response.status_code
        text = status_message((e.response.body or b"").decode("utf-8", "replace").strip()) or f"HTTP {code}"
        refusal = api_refusal(what, namespace, code, text)
        if refusal is not None and code in (401, 403):
            refusal.hint = f"check with: kubectl auth can-i create pods/exec -n {namespace}"
        raise (refusal or ExecFailed(f"{what}: refused ({text})")) from e
    except websockets.ConnectionClosedError as e:
        raise TunnelDropped(f"{what}: the stream was cut ({e})") from e
    except TimeoutError as e:
        raise TransientError(f"{what}: no answer within {timeout:.0f}s") from e
    except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as e:
        raise ClusterUnreachable(f"{what}: cannot reach the API server ({e.__class__.__name__}: {e})") from e
    if not status:
        # The API server ends every exec with a Status on the error channel, success included: a
        # stream closed (even cleanly) without one was cut (an API server or kubelet restart, a
        # proxy), and its output may be short. Never taken as the command's whole answer.
        raise TunnelDropped(f"{what}: the stream ended before the command's exit status")
    reason = exec_status(bytes(status))
    if reason is not None:
        detail = err.decode("utf-8", "replace").strip()
        raise ExecFailed(f"{what}: {' '.join(argv)}: {reason}" + (f" ({detail[:300]})" if detail else ""))
    return bytes(out)
