"""Which names are the cluster's, and what they are called inside it (pure logic, no I/O).

The rules Telepresence users know (``tpenv connect``; docs/connect.md):

- ``svc`` (one label): a Service of the search namespaces, in order (the intercepted workloads'
  namespaces, the connected namespace, then the mapped ones);
- ``svc.ns`` and ``pod-0.svc.ns``: ``ns`` is a namespace of the cluster;
- ``svc.ns.svc`` and ``pod-0.svc.ns.svc``: the ``svc`` pseudo-domain;
- anything under the cluster domain (``svc.ns.svc.cluster.local``) as it is.

Everything else is not the cluster's and goes to the machine's usual resolver untouched, as do
names ending in an excluded suffix (Telepresence's defaults: ``.com .io .net .org .arpa .ru``):
a cluster is never asked about ``example.com``.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

DEFAULT_EXCLUDED_SUFFIXES = (".com", ".io", ".net", ".org", ".arpa", ".ru")
DEFAULT_CLUSTER_DOMAIN = "cluster.local"


def normal(name: str) -> str:
    """Lower case, no trailing dot: the form the rules compare."""
    return name.strip().rstrip(".").lower()


@dataclass
class NameRules:
    """``search``: namespaces whose short names resolve, in order; ``namespaces``: every namespace
    the cluster has (``svc.ns`` is a cluster name only when ``ns`` is one of them)."""

    search: list[str]
    namespaces: set[str] = field(default_factory=set)
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    excluded_suffixes: tuple[str, ...] = DEFAULT_EXCLUDED_SUFFIXES

    def __post_init__(self) -> None:
        self.cluster_domain = normal(self.cluster_domain)
        self.search = list(dict.fromkeys(self.search))  # order kept, duplicates dropped
        self.excluded_suffixes = tuple("." + normal(s).lstrip(".") for s in self.excluded_suffixes)

    def candidates(self, name: str) -> list[str] | None:
        """The cluster FQDNs (no trailing dot) to ask for ``name``, best first; None when the
        name is not the cluster's (ask the usual resolver)."""
        n = normal(name)
        if not n:
            return None
        domain = self.cluster_domain
        if n == domain or n.endswith("." + domain):
            return [n]
        if any(n.endswith(s) or n == s[1:] for s in self.excluded_suffixes):
            return None
        labels = n.split(".")
        if len(labels) == 1:
            return [f"{n}.{ns}.svc.{domain}" for ns in self.search] or None
        if labels[-1] == "svc" and len(labels) >= 3:
            return [f"{n}.{domain}"]
        if labels[-1] in self.namespaces or labels[-1] in self.search:
            return [f"{n}.svc.{domain}"]
        return None

    def needs_namespaces(self, name: str) -> bool:
        """True when ``name`` could be ``svc.ns`` for a namespace not known yet: worth a fresh
        list of namespaces before sending it upstream."""
        n = normal(name)
        labels = n.split(".")
        return (len(labels) in (2, 3) and self.candidates(n) is None
                and not any(n.endswith(s) for s in self.excluded_suffixes)
                and labels[-1] not in self.namespaces)

    @property
    def suffixes(self) -> list[str]:
        """The DNS suffixes that are the cluster's: what a capture routes to tpenv's resolver
        (systemd-resolved routing domains); single-label names go there too."""
        return [self.cluster_domain, "svc", *sorted(set(self.search) | self.namespaces)]

    @property
    def search_list(self) -> list[str]:
        """A resolv.conf ``search`` line as a pod of the first search namespace has it."""
        domain = self.cluster_domain
        return [*(f"{ns}.svc.{domain}" for ns in self.search[:1]), f"svc.{domain}", domain]


def merge_search(*groups: Iterable[str]) -> list[str]:
    """Namespaces of several groups, in order, each once."""
    return list(dict.fromkeys(ns for g in groups for ns in g if ns))


__all__ = ["NameRules", "DEFAULT_EXCLUDED_SUFFIXES", "DEFAULT_CLUSTER_DOMAIN", "normal", "merge_search"]
