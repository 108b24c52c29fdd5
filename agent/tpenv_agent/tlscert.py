"""The webhook's TLS material: a CA and a serving certificate for ``tpenv-manager.<ns>.svc``.

One definition for the two places that make it: ``tpenv manager install|upgrade`` (the client,
tpenv.engine.manager) and the manager itself when it rotates its certificate before expiry
(certrotate.py). PEM bytes: ``ca.crt``, ``tls.crt``, ``tls.key`` (the Secret's keys).

A certificate is due for renewal once two thirds of its lifetime have passed (``renew_at``):
a 5-year certificate is renewed after about 3.3 years, a 3-minute test one after 2 minutes,
always long before the API server would refuse it.
"""
from __future__ import annotations

import datetime as dt

SERVICE = "tpenv-manager"
DEFAULT_LIFETIME = dt.timedelta(days=5 * 365)
SKEW = dt.timedelta(minutes=5)  # notBefore this far back: tolerate clocks a little behind ours


def generate(namespace: str, lifetime: dt.timedelta = DEFAULT_LIFETIME, *,
             now: dt.datetime | None = None) -> dict[str, bytes]:
    """A fresh CA and a serving certificate for the manager's Service, valid ``lifetime`` from now."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = now or dt.datetime.now(dt.timezone.utc)
    # A short-lived certificate gets a proportionally short skew, so renew_at stays meaningful.
    start, end = now - min(SKEW, lifetime / 10), now + lifetime
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tpenv-manager-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    dns = [SERVICE, f"{SERVICE}.{namespace}", f"{SERVICE}.{namespace}.svc", f"{SERVICE}.{namespace}.svc.cluster.local"]
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


def validity(cert_pem: bytes) -> tuple[dt.datetime, dt.datetime]:
    """(notBefore, notAfter) of a PEM certificate, UTC. ValueError when it is not one."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def lifetime_of(cert_pem: bytes) -> dt.timedelta:
    """The ``lifetime`` ``generate`` was given for this certificate (its validity minus the skew),
    so a rotation keeps the lifetime an admin chose at install."""
    start, end = validity(cert_pem)
    total = end - start
    # generate: total = lifetime + min(SKEW, lifetime / 10); invert both branches.
    return total - SKEW if total >= SKEW * 11 else total / 1.1


def renew_at(cert_pem: bytes) -> dt.datetime:
    """When the certificate is due for renewal: two thirds into its lifetime."""
    start, end = validity(cert_pem)
    return end - (end - start) / 3


__all__ = ["generate", "validity", "lifetime_of", "renew_at", "DEFAULT_LIFETIME"]
