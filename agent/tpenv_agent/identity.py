"""Who a session is, as the cluster says (protocol §2.1, issue 12).

Holding Secret ``tpenv-auth`` lets anyone sign an SSH certificate for any session id, so the
certificate says nothing about *who* connects. The client therefore hands the agent the bearer
token it uses with the API server, and the agent asks the API server, with that token, who it
belongs to (``SelfSubjectReview``, authentication.k8s.io/v1) and, for ``force``, whether that
user may ``force`` ``intercepts.tpenv.io`` in this namespace (``SelfSubjectAccessReview``).
Both are allowed to every authenticated user, so the agent needs no RBAC of its own, and the
answer comes from the cluster, not from the client. The token is used for these two requests
only: never stored, never logged.

A client that authenticates without a bearer token (a client certificate, an exec plugin
that yields a certificate) cannot be verified this way: its session is *unverified* and owns
its intercepts by session id only (shown so in ``list``).
"""
from __future__ import annotations

import asyncio
import json
import os
import ssl
import urllib.error
import urllib.request
from typing import Any

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
FORCE = {"group": "tpenv.io", "resource": "intercepts", "verb": "force"}


class IdentityError(Exception):
    """The cluster did not vouch for the token (rejected, or unreachable)."""


class ApiServer:
    """The in-cluster API server, reached as the kubelet tells every container (env + CA file)."""

    def __init__(self, url: str | None = None, ca_file: str | None = None, timeout: float = 10.0) -> None:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if url is None and host:
            url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        self.url = url
        self.ca_file = ca_file or os.path.join(SA_DIR, "ca.crt")
        self.timeout = timeout

    @property
    def available(self) -> bool:
        return bool(self.url) and os.path.exists(self.ca_file)

    def _post(self, path: str, body: dict[str, Any], token: str) -> dict[str, Any]:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise IdentityError(f"the API server rejected the session's token ({e.code})") from None
            raise IdentityError(f"the API server answered {e.code} to {path}") from None
        except (OSError, ValueError) as e:
            raise IdentityError(f"cannot reach the API server: {type(e).__name__}") from None

    async def whoami(self, token: str) -> str:
        """The user name the cluster authenticates ``token`` as."""
        doc = await asyncio.to_thread(self._post, "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                      {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
                                      token)
        user = ((doc.get("status") or {}).get("userInfo") or {}).get("username")
        if not user:
            raise IdentityError("the API server did not say who the token belongs to")
        return str(user)

    async def may_force(self, token: str, namespace: str) -> bool:
        """Whether the token's user may ``force`` ``intercepts.tpenv.io`` in ``namespace``."""
        doc = await asyncio.to_thread(self._post, "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {**FORCE, "namespace": namespace}}}, token)
        return bool((doc.get("status") or {}).get("allowed"))
