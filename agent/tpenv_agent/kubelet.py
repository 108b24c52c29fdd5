"""The kubelet's probes of an intercepted port stay with the app (docs/design.md "Injection").

With the in-pod redirect every connection to an app port meets the agent, the kubelet's
``httpGet``, ``tcpSocket`` and ``grpc`` probes included. During an all-TCP intercept they would
reach the developer's handler, which knows nothing of ``/healthz``: a 404 makes the pod NotReady
(the Service drops it, and the intercept with it) or, for a liveness probe, restarts the app.

- A request whose ``User-Agent`` starts with ``kube-probe/`` (the kubelet's own, HTTP/1 and gRPC)
  is routed to the app, never to a handler or a mirror (``is_probe``).
- Which connections to look at: an all-TCP intercept must not wait for a caller's first bytes
  (server-speaks-first protocols), so only connections from an address the kubelet probes from
  are sniffed. That address is learnt, not configured: the kubelet probes the agent's own health
  port every few seconds, and its source there is its source everywhere in the pod (bridge CNIs:
  the pod's gateway; Calico: the node's address), whatever the CNI (``KubeletPeers``).
- A connection from that address that closes without a byte (a ``tcpSocket`` probe) is closed
  here: neither the app nor the handler sees it.
- Until the kubelet has probed the agent once, no address is known: intercepts then take
  nothing, the app gets every connection and request (``Registry.taking``). The pod is not
  Ready before that probe (it is the agent's readiness probe), so no Service sends it anything;
  a client that registers its intercept while the pod starts (issue 13) would otherwise give
  the laptop the app's first probes.

Spoofing the header costs a caller nothing but its own request going to the app, as it would
without tpenv; recording an address needs a TCP handshake from it.
"""
from __future__ import annotations

import collections
from typing import Any

from .routeprobe import plain_ip

PROBE_AGENT = b"kube-probe/"
_KEPT = 4  # addresses remembered (dual-stack nodes, a node whose address changed)


def is_probe(headers: dict[bytes, list[bytes]]) -> bool:
    """``headers``: lower-case name -> values (HTTP/1 and HTTP/2 alike)."""
    return any(v.startswith(PROBE_AGENT) for v in headers.get(b"user-agent", ()))


def _host(peer: Any) -> str | None:
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return plain_ip(peer[0])  # dual-stack sockets map IPv4
    return None


class KubeletPeers:
    """The addresses the kubelet's probes came from, most recent last (bounded)."""

    def __init__(self) -> None:
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    def saw_probe(self, peer: Any) -> None:
        host = _host(peer)
        if host is None:
            return
        self._seen[host] = None
        self._seen.move_to_end(host)
        while len(self._seen) > _KEPT:
            self._seen.popitem(last=False)

    def __contains__(self, peer: Any) -> bool:
        host = _host(peer)
        return host is not None and host in self._seen

    def __len__(self) -> int:
        return len(self._seen)
