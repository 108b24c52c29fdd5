"""What the manager does through its pod's service account: calls to the API server, and the
``tpenv-auth`` Secrets (docs/protocol.md §2) it makes with them.

Stdlib only (urllib), blocking: callers run these in a thread. ``in_cluster()`` says whether the
service account is there at all; outside a cluster the manager skips what needs it.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from .authkeys import auth_material
from .inject import AUTH_SECRET

log = logging.getLogger("tpenv_agent.manager")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
def in_cluster() -> bool:
    return (SA_DIR / "token").exists() and "KUBERNETES_SERVICE_HOST" in os.environ


def _request(path: str, method: str = "GET", body: dict | None = None) -> urllib.request.Request:
    """A request to the API server, authenticated as the pod's service account."""
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host
    return urllib.request.Request(
        f"https://{host}:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {(SA_DIR / 'token').read_text().strip()}",
                 "Content-Type": "application/json", "Accept": "application/json"})


def _tls() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))


def api_call(method: str, path: str, body: dict | None = None, timeout: float = 10) -> dict:
    """One call to the API server with the pod's service account; HTTPError on a refusal. Blocking."""
    with urllib.request.urlopen(_request(path, method, body), context=_tls(), timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def api_stream(path: str, timeout: float):
    """GET a watch through the API server; yields its lines (JSON events) as they come. Blocking."""
    with urllib.request.urlopen(_request(path), context=_tls(), timeout=timeout) as resp:
        for line in resp:
            if line.strip():
                yield line


def create_auth_secret(namespace: str) -> bool:
    """POST the Secret through the in-cluster API; False when it already exists (409). Blocking."""
    secret = {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": AUTH_SECRET, "namespace": namespace,
                     "labels": {"app.kubernetes.io/managed-by": "tpenv"}},
        "data": {k: base64.b64encode(v).decode() for k, v in auth_material().items()},
    }
    try:
        api_call("POST", f"/api/v1/namespaces/{namespace}/secrets", secret)
        return True
    except urllib.error.HTTPError as e:
        if e.code == 409:
            return False
        raise


def relay_auth_material(namespace: str) -> dict[str, bytes]:
    """Secret tpenv-auth of the manager's own namespace (created first when missing). Blocking."""
    created = create_auth_secret(namespace)
    secret = api_call("GET", f"/api/v1/namespaces/{namespace}/secrets/{AUTH_SECRET}")
    data = secret.get("data") or {}
    missing = [k for k in ("ca.pub", "host_key") if k not in data]
    if missing:
        raise ValueError(f"Secret {AUTH_SECRET} in {namespace} lacks {', '.join(missing)}: delete it and restart "
                         "the manager")
    log.info("[relay/auth] Secret %s in %s %s", AUTH_SECRET, namespace, "created" if created else "already there")
    return {k: base64.b64decode(data[k]) for k in ("ca.pub", "host_key")}


async def api_get_or_none(path: str) -> dict | None:
    """GET through the API; None when it is not there or not ours to read (404, 403)."""
    try:
        return await asyncio.to_thread(api_call, "GET", path)
    except urllib.error.HTTPError as e:
        if e.code in (403, 404):
            return None
        raise


def own_addresses() -> list:
    """The pod's own IPs (downward API ``status.podIPs`` in TPENV_POD_IPS): the relay never dials them."""
    import ipaddress

    out = []
    for v in os.environ.get("TPENV_POD_IPS", "").replace(",", " ").split():
        try:
            out.append(ipaddress.ip_address(v))
        except ValueError:
            log.warning("[relay/ranges] TPENV_POD_IPS: %r is not an address", v)
    return out
