"""The manager's TLS: its own CA and the webhook Service's serving certificate (the API server
checks it against the webhook's caBundle), made by ``tpenv manager install`` and reused by
``upgrade`` until it nears expiry. Apart from manager.py: it is the one part that needs
``cryptography``, and it is read on its own when a certificate is questioned.
"""
from __future__ import annotations

import base64
import datetime as dt

from tpenv.engine.teammode import NAMESPACE

NAME = "tpenv-manager"  # the manager's Service: the certificate's names
RENEW_BEFORE = dt.timedelta(days=30)
CERT_LIFETIME = dt.timedelta(days=5 * 365)


def generate_tls(namespace: str = NAMESPACE, *, now: dt.datetime | None = None) -> dict[str, bytes]:
    """A fresh CA and a serving certificate for the manager's Service, PEM: ca.crt, tls.crt, tls.key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = now or dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + CERT_LIFETIME  # tolerate small clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tpenv-manager-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    dns = [NAME, f"{NAME}.{namespace}", f"{NAME}.{namespace}.svc", f"{NAME}.{namespace}.svc.cluster.local"]
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[2])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return {
        "ca.crt": ca.public_bytes(pem),
        "tls.crt": cert.public_bytes(pem),
        "tls.key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }


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
