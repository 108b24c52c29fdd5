"""The manager renews its own webhook certificate before it expires (issue 12).

Before, only ``tpenv manager install|upgrade`` made a new certificate: a cluster nobody upgraded
stopped injecting the day it expired, silently (failurePolicy Ignore admits every pod, without
an agent). Now the manager keeps a timer on its serving certificate and, two thirds into its
lifetime (tlscert.renew_at), makes a new CA and certificate with the same lifetime, in an order
that never leaves the API server without a certificate it trusts:

1. the webhook configuration's caBundle becomes new CA + current CA (both accepted);
2. the manager serves the new certificate (loaded into its live SSLContext: new handshakes use
   it, open connections finish on the old one);
3. Secret ``tpenv-manager-tls`` gets the new material, so a restarted pod and the next
   ``tpenv manager upgrade`` use it (the old CA leaves the bundle at the next rotation or upgrade).

A step that fails is logged and retried with backoff; the old certificate is still served and
trusted meanwhile, and ``tpenv doctor`` warns as its expiry nears. RBAC: get/update of that one
Secret and that one MutatingWebhookConfiguration, by name (templates/manager/20-rbac.yaml.j2).
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import os
import ssl
import urllib.error
from pathlib import Path
from typing import Callable

from .tlscert import generate, lifetime_of, renew_at

log = logging.getLogger("tpenv_agent.manager")

RETRY_MIN = 10.0
RETRY_MAX = 600.0
MAX_SLEEP = 6 * 3600.0  # re-read the clock at least this often (a suspended VM's timers drift)


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))
        return True
    except asyncio.TimeoutError:
        return False


class Rotator:
    """Keeps ``ctx`` serving a certificate that is not due; ``material``: the PEMs it serves now."""

    def __init__(self, ctx: ssl.SSLContext, material: dict[str, bytes], namespace: str,
                 api: Callable[..., dict], work_dir: Path, webhook: str, secret: str) -> None:
        self.ctx, self.material, self.namespace = ctx, material, namespace
        self.api, self.work_dir, self.webhook, self.secret = api, work_dir, webhook, secret
        self.rotations = 0

    async def run(self, stop: asyncio.Event) -> str:
        delay = RETRY_MIN
        while True:
            wait = (renew_at(self.material["tls.crt"]) - dt.datetime.now(dt.timezone.utc)).total_seconds()
            if wait > 0:
                log.info("[tls/rotate] certificate renewal due in %.0fs", wait)
                if await _stopped(stop, min(wait, MAX_SLEEP)):
                    return "stopped"
                continue
            try:
                await self.rotate()
                delay = RETRY_MIN
            except (OSError, urllib.error.URLError, ValueError, KeyError, ssl.SSLError) as e:
                log.warning("[tls/rotate] renewing the webhook certificate failed (the current one is still served; "
                            "retrying in %.0fs): %s: %s", delay, type(e).__name__, e)
                if await _stopped(stop, delay):
                    return "stopped"
                delay = min(delay * 2, RETRY_MAX)

    async def rotate(self) -> None:
        new = generate(self.namespace, lifetime_of(self.material["tls.crt"]))
        await asyncio.to_thread(self._trust, new["ca.crt"] + self.material["ca.crt"])
        self._serve(new)
        await asyncio.to_thread(self._store, new)
        self.material = new
        self.rotations += 1
        log.info("[tls/rotate] webhook certificate renewed (rotation %d); next renewal at %s", self.rotations,
                 renew_at(new["tls.crt"]).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def _trust(self, bundle: bytes) -> None:
        path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{self.webhook}"
        config = self.api("GET", path)
        mine = [w for w in config.get("webhooks") or []
                if ((w.get("clientConfig") or {}).get("service") or {}).get("namespace") == self.namespace]
        if not config.get("webhooks"):
            return  # no namespace selected for injection: no entry whose caBundle could trust us
        if not mine:
            raise ValueError(f"MutatingWebhookConfiguration {self.webhook} has no webhook served from {self.namespace}")
        for w in mine:
            w["clientConfig"]["caBundle"] = base64.b64encode(bundle).decode()
        self.api("PUT", path, config)

    def _serve(self, new: dict[str, bytes]) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cert, key = self.work_dir / "tls.crt", self.work_dir / "tls.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(new["tls.key"])
        cert.write_bytes(new["tls.crt"])
        self.ctx.load_cert_chain(cert, key)

    def _store(self, new: dict[str, bytes]) -> None:
        path = f"/api/v1/namespaces/{self.namespace}/secrets/{self.secret}"
        secret = self.api("GET", path)
        secret["data"] = {**(secret.get("data") or {}), **{k: base64.b64encode(v).decode() for k, v in new.items()}}
        self.api("PUT", path, secret)


def read_material(tls_dir: Path) -> dict[str, bytes]:
    """The PEMs the manager starts with (its mounted Secret); ca.crt may be absent (older installs)."""
    out = {k: (tls_dir / k).read_bytes() for k in ("tls.crt", "tls.key")}
    ca = tls_dir / "ca.crt"
    out["ca.crt"] = ca.read_bytes() if ca.exists() else b""
    return out


__all__ = ["Rotator", "read_material"]
