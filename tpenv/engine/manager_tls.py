"""The manager's TLS: its own CA and the webhook Service's serving certificate (the API server
checks it against the webhook's caBundle), made by ``tpenv manager install`` and reused by
``upgrade`` until it nears expiry; between upgrades the manager renews it itself
(tpenv_agent.certrotate), with the same generator (tpenv_agent.tlscert). Apart from manager.py: it is the one part that needs
``cryptography``, and it is read on its own when a certificate is questioned.
"""
from __future__ import annotations

import base64
import datetime as dt

from tpenv.engine.teammode import NAMESPACE
from tpenv_agent import tlscert

NAME = "tpenv-manager"  # the manager's Service: the certificate's names
RENEW_BEFORE = dt.timedelta(days=30)
CERT_LIFETIME = tlscert.DEFAULT_LIFETIME


def generate_tls(namespace: str = NAMESPACE, *, now: dt.datetime | None = None,
                 lifetime: dt.timedelta = CERT_LIFETIME) -> dict[str, bytes]:
    """A fresh CA and a serving certificate for the manager's Service, PEM: ca.crt, tls.crt, tls.key
    (tpenv_agent.tlscert: the manager makes its own renewals with the same code)."""
    return tlscert.generate(namespace, lifetime, now=now)


def reusable_tls(secret: dict | None, namespace: str = NAMESPACE, *, now: dt.datetime | None = None) -> dict[str, bytes] | None:
    """The TLS material of an installed manager's Secret, if complete, for this Service and not expiring."""
    from cryptography import x509

    data = (secret or {}).get("data") or {}
    if not all(k in data for k in ("ca.crt", "tls.crt", "tls.key")):
        return None
    try:
        tls = {k: base64.b64decode(data[k]) for k in ("ca.crt", "tls.crt", "tls.key")}
        cert = x509.load_pem_x509_certificate(tls["tls.crt"])
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except (ValueError, x509.ExtensionNotFound):
        return None
    now = now or dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc - now < RENEW_BEFORE or f"{NAME}.{namespace}.svc" not in names:
        return None
    return tls


__all__ = ["generate_tls", "reusable_tls", "CERT_LIFETIME", "RENEW_BEFORE"]
