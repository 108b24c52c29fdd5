"""Route probes (protocol §3.1): proving from inside the cluster that a Service's ClusterIP
sends new connections to agent-carrying pods.

The client opens a short *watch* on every agent, asks one agent to *dial* the ClusterIP a few
times on fresh connections, then asks every agent which probes it *saw*. A probe is marked by
its TCP MSS option (:data:`MARK_MSS`, set on the dialing socket): NAT keeps TCP options, so the
mark survives kube-proxy's DNAT and the SNAT of a pod reaching itself through its Service
(hairpin, which kube-proxy does with ``--random-fully``: a new source port, so addresses alone
cannot tell a hairpinned probe). The receiving agent reads the MSS of an accepted connection only
while a watch is open (one ``getsockopt`` per connection for those seconds; outside a watch the
cost is one attribute test) and closes a probe at once: it never reaches the app or a client.
"""
from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

# The probe's MSS: an odd value no stack picks by itself. The receiver sees it as is, or less
# the 12 bytes of TCP timestamps (Linux reports the usable MSS).
MARK_MSS = 1237
MARKED = frozenset({MARK_MSS, MARK_MSS - 12})
WATCH_MAX = 300.0  # seconds a watch may last; a client that vanished cannot leave one open
DIAL_MAX = 64      # probes per dial
SEEN_MAX = 256     # probe peers kept per watch


def plain_ip(host: str) -> str:
    """An IPv4-mapped IPv6 address (a dual-stack listener's view of an IPv4 caller) as IPv4."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class ProbeRecord:
    """The probes this agent's listeners accepted during the open watch. Bounded and timed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, limit: int = SEEN_MAX) -> None:
        self.clock = clock
        self.until = 0.0  # a watch is open while clock() < until; 0: none (the listener's cheap test)
        self._seen: deque[tuple[str, int]] = deque(maxlen=limit)

    def watch(self, seconds: float) -> None:
        """Open (or reopen) a watch of ``seconds`` (0 ends it); forgets what the last one saw."""
        seconds = min(max(float(seconds), 0.0), WATCH_MAX)
        self.until = self.clock() + seconds if seconds > 0 else 0.0
        self._seen.clear()

    def watching(self) -> bool:
        if self.until and self.clock() >= self.until:
            self.until = 0.0
            self._seen.clear()
        return bool(self.until)

    def is_probe(self, mss: int, peer: Any) -> bool:
        """Records ``peer`` when ``mss`` marks a probe and a watch is open."""
        if mss not in MARKED or not self.watching():
            return False
        if isinstance(peer, (tuple, list)) and len(peer) >= 2:
            self._seen.append((plain_ip(str(peer[0])), int(peer[1])))
        return True

    def catch(self, transport: Any) -> bool:
        """Whether the connection just accepted on ``transport`` is a probe (recorded if so)."""
        if not self.watching():  # an expired watch stops the getsockopt at the next connection
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        except OSError:
            return False
        return self.is_probe(mss, transport.get_extra_info("peername"))

    def take(self) -> list[tuple[str, int]]:
        """What was seen since the watch opened (or the last take), forgotten here."""
        out = list(self._seen)
        self._seen.clear()
        return out


async def dial(host: str, port: int, count: int, timeout: float) -> list[dict[str, Any]]:
    """``count`` marked connections to ``host:port`` at once, each closed as soon as it is
    made: ``{"local": [ip, port], "ok": True}``, or ``"ok": False`` with ``error`` (refused,
    timed out, unreachable: the node still sends it somewhere that is not listening)."""
    count = min(max(int(count), 1), DIAL_MAX)
    return list(await asyncio.gather(*(_one(host, port, timeout) for _ in range(count))))


async def _one(host: str, port: int, timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    out: dict[str, Any] = {"local": None, "ok": False}
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, MARK_MSS)
        # Bound first: the local port is known even when the connect then fails.
        sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", 0))
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        out["ok"] = True
    except asyncio.TimeoutError:
        out["error"] = f"no answer within {timeout:g}s"
    except OSError as e:
        out["error"] = e.strerror or type(e).__name__
    finally:
        try:
            name = sock.getsockname()
            out["local"] = [plain_ip(name[0]), name[1]]
        except OSError:
            pass
        sock.close()
    return out
