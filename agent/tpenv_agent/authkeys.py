"""The four keys of Secret ``tpenv-auth`` (docs/protocol.md §2): a user CA and the agents' host
key, ed25519, OpenSSH-encoded.

One maker for both writers of that Secret: the manager (webhook mode) and the client (patch
mode, on its first intercept in a namespace). cryptography alone, not asyncssh: on the client
this runs before the workload's write, and asyncssh's import (a quarter of a second) belongs
after it, while the pods start (tpenv/engine/lateimports.py).
"""
from __future__ import annotations

AUTH_KEYS = ("ca_key", "ca.pub", "host_key", "host_key.pub")


def auth_material() -> dict[str, bytes]:
    """A fresh user CA and agent host key: ``{"ca_key", "ca.pub", "host_key", "host_key.pub"}``."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    def pair() -> tuple[bytes, bytes]:
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption())
        return private, key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH) + b"\n"

    ca_key, ca_pub = pair()
    host_key, host_pub = pair()
    return {"ca_key": ca_key, "ca.pub": ca_pub, "host_key": host_key, "host_key.pub": host_pub}
