"""A kubeconfig for a local stand-in API server (tests that run the real kube kit against it)."""
from __future__ import annotations

import json
from pathlib import Path


def token_kubeconfig(path: Path, server: str, *, token: str = "t", namespace: str = "team") -> Path:
    """One cluster ``server``, one bearer-token user, one current context with ``namespace``."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": namespace}}]}))
    return path
