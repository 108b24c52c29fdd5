"""The cluster's PKI and kubeconfigs, made with the `openssl` CLI (EC P-256: fast to generate).

One CA signs everything. Who is who (the names are what RBAC and the Node authorizer
look at): admin and the API server's kubelet client are in O=system:masters; each
control-plane component uses its built-in user name (system:kube-controller-manager,
system:kube-scheduler, system:kube-proxy); the kubelet is system:node:<node> in
O=system:nodes. Existing files are kept, so a warm `up` does nothing here; a cert whose
SANs no longer match (a different node IP) is reissued.
"""
from __future__ import annotations

import base64
import json
import subprocess
import tempfile
from pathlib import Path

from proc import run

DAYS = "3650"


def _key(path: Path) -> None:
    if not path.exists():
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path],
            quiet=True)
        path.chmod(0o600)


def ensure_ca(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    if (d / "ca.crt").exists():
        return
    _key(d / "ca.key")
    run(["openssl", "req", "-x509", "-new", "-key", d / "ca.key", "-subj", "/CN=tpenv-cluster-ca", "-days", DAYS,
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-out", d / "ca.crt"], quiet=True)


def _sans_of(cert: Path) -> str:
    out = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True).stdout
    return out


def ensure_cert(d: Path, name: str, cn: str, org: str | None = None, *, server: bool = False,
                client: bool = False, sans: list[str] | None = None) -> tuple[Path, Path]:
    """<name>.crt/.key signed by the CA; reissued when a wanted SAN is missing."""
    crt, key = d / f"{name}.crt", d / f"{name}.key"
    sans = sans or []
    if crt.exists() and key.exists():
        have = _sans_of(crt)
        if all(s.split(":", 1)[1] in have for s in sans):
            return crt, key
    _key(key)
    subj = f"/CN={cn}" + (f"/O={org}" if org else "")
    usages = [u for u, on in (("serverAuth", server), ("clientAuth", client)) if on]
    ext = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
           f"extendedKeyUsage={','.join(usages)}"]
    if sans:
        ext.append("subjectAltName=" + ",".join(sans))
    with tempfile.NamedTemporaryFile("w", suffix=".ext") as extfile:
        extfile.write("\n".join(ext) + "\n")
        extfile.flush()
        csr = d / f"{name}.csr"
        run(["openssl", "req", "-new", "-key", key, "-subj", subj, "-out", csr], quiet=True)
        run(["openssl", "x509", "-req", "-in", csr, "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
             "-CAcreateserial", "-days", DAYS, "-extfile", extfile.name, "-out", crt], quiet=True)
        csr.unlink()
    return crt, key


def ensure_sa_keys(d: Path) -> None:
    """The service-account token signing key pair."""
    _key(d / "sa.key")
    if not (d / "sa.pub").exists():
        run(["openssl", "pkey", "-in", d / "sa.key", "-pubout", "-out", d / "sa.pub"], quiet=True)


def _b64(p: Path) -> str:
    return base64.b64encode(p.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, crt: Path, key: Path, user: str) -> Path:
    """A self-contained kubeconfig (certs embedded), written as JSON, which is valid YAML."""
    cfg = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "tpenv", "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": _b64(crt), "client-key-data": _b64(key)}}],
        "contexts": [{"name": "tpenv", "context": {"cluster": "tpenv", "user": user}}],
        "current-context": "tpenv",
    }
    text = json.dumps(cfg, indent=2) + "\n"
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o600)
    return path
