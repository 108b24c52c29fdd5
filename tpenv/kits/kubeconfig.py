"""The reader's kubeconfig as data: which contexts exist, and the cluster and server behind each.

`contexts:` entries of telepresence.yaml find their cluster here by server URL, cluster name or
candidate context names, so a committed file never names one developer's context. Loading the
credentials themselves stays with the ``kubernetes`` package (:meth:`tpenv.kits.kube.Kube.load`);
this module only reads names and addresses, which needs no exec plugin and no network.

Files are merged as kubectl merges ``KUBECONFIG=a:b``: the first file that defines a context
(or a cluster, or current-context) wins.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from tpenv.errors import ConfigError

_DEFAULT_PORTS = {"https": 443, "http": 80}


@dataclass(frozen=True)
class KubeconfigContext:
    """One context of the kubeconfig: its name, cluster (name and server), user and namespace."""

    name: str
    cluster: str | None
    server: str | None
    user: str | None
    namespace: str | None

    def describe(self) -> str:
        return f"{self.name} (cluster {self.cluster or '?'}, server {self.server or '?'})"


@dataclass(frozen=True)
class Kubeconfig:
    contexts: tuple[KubeconfigContext, ...]
    current: str | None
    files: tuple[str, ...]

    @classmethod
    def read(cls, config_file: str | None = None, environ: Mapping[str, str] | None = None) -> "Kubeconfig":
        """``config_file``, else ``$KUBECONFIG`` (a ``:``-separated list), else ``~/.kube/config``."""
        environ = os.environ if environ is None else environ
        if config_file:
            paths = [config_file]
        elif environ.get("KUBECONFIG"):
            paths = [p for p in environ["KUBECONFIG"].split(os.pathsep) if p]
        else:
            paths = [str(Path("~/.kube/config").expanduser())]
        clusters: dict[str, dict[str, Any]] = {}
        contexts: dict[str, dict[str, Any]] = {}
        current: str | None = None
        read: list[str] = []
        for path in paths:
            doc = _load(path, must_exist=bool(config_file))
            if doc is None:
                continue
            read.append(path)
            for item in _named(doc.get("clusters")):
                clusters.setdefault(item["name"], item.get("cluster") or {})
            for item in _named(doc.get("contexts")):
                contexts.setdefault(item["name"], item.get("context") or {})
            current = current or (doc.get("current-context") or None)
        out = []
        for name, ctx in contexts.items():
            cluster = ctx.get("cluster")
            server = (clusters.get(cluster) or {}).get("server") if isinstance(cluster, str) else None
            out.append(KubeconfigContext(name, cluster if isinstance(cluster, str) else None,
                                         server if isinstance(server, str) else None,
                                         ctx.get("user") if isinstance(ctx.get("user"), str) else None,
                                         ctx.get("namespace") if isinstance(ctx.get("namespace"), str) else None))
        return cls(tuple(out), current if isinstance(current, str) else None, tuple(read))

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.contexts]

    def get(self, name: str) -> KubeconfigContext | None:
        return next((c for c in self.contexts if c.name == name), None)

    def match(self, *, server: str | None = None, cluster: str | None = None,
              candidates: list[str] | tuple[str, ...] = ()) -> list[KubeconfigContext]:
        """The contexts left after narrowing by ``server``, then ``cluster``, then the first of
        ``candidates`` still present (each only when given)."""
        left = list(self.contexts)
        if server:
            left = [c for c in left if c.server and same_server(c.server, server)]
        if cluster:
            left = [c for c in left if c.cluster == cluster]
        if candidates:
            by_name = {c.name: c for c in left}
            first = next((by_name[n] for n in candidates if n in by_name), None)
            left = [first] if first else []
        return left

    def summary(self) -> str:
        """The contexts there are, for error messages."""
        if not self.contexts:
            where = ", ".join(self.files) or "no kubeconfig file found"
            return f"your kubeconfig has no contexts ({where})"
        return "your kubeconfig has: " + "; ".join(c.describe() for c in self.contexts)


@contextlib.contextmanager
def load_errors() -> Iterator[list[str]]:
    """The errors the ``kubernetes`` package only logs (on the root logger) while this thread loads
    a kubeconfig. A failing exec plugin is one: the client is left with no credentials, and every
    request after would be refused as anonymous without the reason. Taken out of the log here, so
    the caller can raise them instead."""
    caught: list[str] = []
    thread = threading.get_ident()

    def catch(record: logging.LogRecord) -> bool:
        if record.thread != thread or record.levelno < logging.ERROR:
            return True
        caught.append(record.getMessage())
        return False

    root = logging.getLogger()
    root.addFilter(catch)
    try:
        yield caught
    finally:
        root.removeFilter(catch)


def same_server(a: str, b: str) -> bool:
    """Two API server URLs name the same server: scheme and host case-insensitive, default port
    implied, a trailing slash ignored."""
    return _norm(a) == _norm(b)


def _norm(url: str) -> tuple[str, str, int | None, str]:
    u = urlsplit(url.strip())
    scheme = (u.scheme or "https").lower()
    try:
        port = u.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        port = None
    return scheme, (u.hostname or url).lower(), port, u.path.rstrip("/")


def _named(items: Any) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        return []
    return [i for i in items if isinstance(i, dict) and isinstance(i.get("name"), str)]


def _load(path: str, *, must_exist: bool) -> dict[str, Any] | None:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError as e:
        if must_exist:
            raise ConfigError(f"kubeconfig {path}: no such file", hint="set KUBECONFIG to your cluster's config") from e
        return None  # kubectl skips missing files of a KUBECONFIG list, too
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"kubeconfig {path}: cannot read it ({e})",
                          hint="set KUBECONFIG to your cluster's config") from e
    try:
        doc = YAML(typ="safe", pure=True).load(text)
    except YAMLError as e:
        raise ConfigError(f"kubeconfig {path}: not valid YAML ({e})") from e
    return doc if isinstance(doc, dict) else None


__all__ = ["Kubeconfig", "KubeconfigContext", "load_errors", "same_server"]
