"""Name lookups for the manager's outbound relay (:mod:`tpenv_agent.relay`, docs/protocol.md §7):
the ``tpenv-resolve`` subsystem and what it answers with.

Apart from the SSH server because it is a protocol of its own (newline-delimited JSON, protocol
§3's framing; ops ``resolve`` and ``ping``) with its own bounds (a line's length, lookups in flight
per channel) and its own failure vocabulary (:class:`LookupNotFound`, :class:`LookupFailed`), which
the relay's ``direct-tcpip`` side reuses when it resolves a destination's host name. Here:
:class:`SystemResolver` (``getaddrinfo`` on a pool of its own, bounded by a timeout), the cluster
domain and the candidate names a request tries (pure), :func:`resolve` (candidates in order, the
answer's fields) and :class:`ResolveSession` (the SSH session channel: the subsystem only; shells,
exec and other subsystems are refused).
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import asyncssh

if TYPE_CHECKING:  # the connection owns its sessions; only the type is needed here
    from .relay import RelayConn

SUBSYSTEM = "tpenv-resolve"
MAX_IN_FLIGHT = 16  # lookups per resolve channel; reading pauses above this (backpressure)
MAX_LINE = 4096  # one request; longer lines end the channel
LOOKUP_TIMEOUT = 5.0


class LookupNotFound(Exception):
    """The name does not exist (NXDOMAIN, or no address)."""


class LookupFailed(Exception):
    """The lookup could not be answered now (timeout, server failure)."""


Resolver = Callable[[str], Awaitable[tuple[list[str], str | None]]]  # name -> (addresses, canonical name)


class SystemResolver:
    """``getaddrinfo`` with the pod's resolver (cluster DNS, search list) in a small thread pool
    of its own, so slow lookups never take the event loop's default executor; each lookup is
    bounded by ``timeout``."""

    def __init__(self, timeout: float = LOOKUP_TIMEOUT, workers: int = 8) -> None:
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="relay-dns")

    async def __call__(self, name: str) -> tuple[list[str], str | None]:
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self._pool, lambda: socket.getaddrinfo(
            name, None, type=socket.SOCK_STREAM, flags=socket.AI_CANONNAME))
        try:
            infos = await asyncio.wait_for(call, self.timeout)
        except asyncio.TimeoutError:
            raise LookupFailed(f"lookup of {name} timed out after {self.timeout:g}s") from None
        except socket.gaierror as e:
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise LookupNotFound(name) from None
            raise LookupFailed(f"lookup of {name} failed: {e.strerror}") from None
        except UnicodeError:  # a label too long for IDNA
            raise LookupNotFound(name) from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        canon = next((info[3] for info in infos if info[3]), None)
        return addresses, canon

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def cluster_domain(resolv_conf: str = "/etc/resolv.conf") -> str:
    """The cluster domain from the pod's search list (``<ns>.svc.cluster.local svc.cluster.local
    cluster.local``: the entry after ``svc.``); ``cluster.local`` when there is none."""
    try:
        with open(resolv_conf, encoding="utf-8") as f:
            for line in f:
                words = line.split()
                if words[:1] == ["search"]:
                    for w in words[1:]:
                        if w.startswith("svc.") and len(w) > 4:
                            return w[4:].rstrip(".")
    except OSError:
        pass
    return "cluster.local"


def nameservers(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    """The pod's ``nameserver`` addresses: the cluster DNS as the kubelet set it (clusterDNS)."""
    found: list[str] = []
    try:
        with open(resolv_conf, encoding="utf-8") as f:
            for line in f:
                words = line.split()
                if words[:1] == ["nameserver"] and len(words) > 1:
                    found.append(words[1])
    except OSError:
        pass
    return found


def candidates(name: str, namespace: str | None, domain: str) -> list[str]:
    """The names a ``resolve`` request tries, in order: a bare name (no dot) with a namespace is
    first ``<name>.<namespace>.svc.<domain>``, then the name itself (the pod's search list)."""
    if namespace and "." not in name:
        return [f"{name}.{namespace}.svc.{domain}.", name]
    return [name]


async def resolve(resolver: Resolver, domain: str, name: str, namespace: str | None) -> dict[str, Any]:
    """A ``resolve`` answer's fields. LookupNotFound when a candidate name is known not to
    exist and none resolved, even if a later fallback could not be asked (a cluster DNS that
    refuses names outside its zones makes glibc report a temporary failure for a bare name);
    LookupFailed when no candidate could be asked at all."""
    not_found = False
    failure: LookupFailed | None = None
    for candidate in candidates(name, namespace, domain):
        try:
            addresses, canon = await resolver(candidate)
        except LookupNotFound:
            not_found = True
            continue
        except LookupFailed as e:
            failure = failure or e
            continue
        if addresses:
            return {"name": candidate.rstrip("."), "addresses": addresses,
                    "cname": canon.rstrip(".") if canon and canon.rstrip(".") != candidate.rstrip(".") else None}
        not_found = True
    if failure is not None and not not_found:
        raise failure
    raise LookupNotFound(name)


class ResolveSession(asyncssh.SSHServerSession):
    """The ``tpenv-resolve`` subsystem: JSON lines in, JSON lines out (protocol §7)."""

    def __init__(self, owner: RelayConn) -> None:
        self.owner = owner
        self.chan: Any = None
        self.buf = b""
        self.tasks: set[asyncio.Task] = set()
        self.subsystem = False
        self.paused = False
        self.eof = False

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.channels -= 1
        for t in list(self.tasks):
            t.cancel()

    def pty_requested(self, *args: Any) -> bool:
        return False

    def shell_requested(self) -> bool:
        self.owner.log.info("shell refused")
        return False

    def exec_requested(self, command: str) -> bool:
        self.owner.log.info("exec refused")
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem != SUBSYSTEM:
            self.owner.log.info("subsystem %r refused", subsystem[:64])
            return False
        self.subsystem = True
        return True

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                self._start(line)
        if len(self.buf) > MAX_LINE:
            self._send({"id": None, "ok": False, "error": {"code": "bad-request",
                                                          "message": f"request longer than {MAX_LINE} bytes"}})
            self.chan.close()

    def eof_received(self) -> bool:
        # Half-open until the answers in flight are written; then the channel closes.
        self.eof = True
        if not self.tasks:
            self.chan.close()
        return True

    def _start(self, line: bytes) -> None:
        task = asyncio.ensure_future(self._answer(line))
        self.tasks.add(task)
        task.add_done_callback(self._done)
        if len(self.tasks) >= MAX_IN_FLIGHT and not self.paused:
            self.paused = True
            self.chan.pause_reading()

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if self.eof and not self.tasks:
            self.chan.close()
            return
        if self.paused and len(self.tasks) < MAX_IN_FLIGHT:
            self.paused = False
            self.chan.resume_reading()

    def _send(self, answer: dict[str, Any]) -> None:
        if not self.chan.is_closing():
            self.chan.write(json.dumps(answer).encode() + b"\n")

    async def _answer(self, line: bytes) -> None:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError:
            self._send({"id": None, "ok": False, "error": {"code": "bad-request", "message": "a JSON object per line"}})
            return
        rid, op = req.get("id"), req.get("op")
        try:
            if op == "ping":
                answer: dict[str, Any] = {"time": time.time()}
            elif op == "resolve":
                name, namespace = req.get("name"), req.get("namespace")
                if not isinstance(name, str) or not name or len(name) > 253 or not (
                        namespace is None or isinstance(namespace, str)):
                    raise _BadRequest("resolve needs a name (string, at most 253 characters) and an optional namespace")
                relay = self.owner.relay
                answer = await resolve(relay.resolver, relay.domain, name, namespace or None)
                self.owner.log.info("resolved %s: %s", name, ", ".join(answer["addresses"]))
            elif op == "info":  # what a client needs to route and resolve as this pod does
                policy = await self.owner.relay.policy.current()
                answer = {"ranges": [str(n) for n in policy.ranges], "domain": self.owner.relay.domain,
                          "nameservers": self.owner.relay.nameservers}
            else:
                raise _BadRequest(f"unknown op {op!r}: resolve, info and ping are served")
        except _BadRequest as e:
            self._send({"id": rid, "ok": False, "error": {"code": "bad-request", "message": str(e)}})
        except LookupNotFound:
            self.owner.log.info("resolved %s: not found", req.get("name"))
            self._send({"id": rid, "ok": False, "error": {"code": "not-found", "message": f"no such name: {req.get('name')}"}})
        except LookupFailed as e:
            self._send({"id": rid, "ok": False, "error": {"code": "internal", "message": str(e)}})
        else:
            self._send({"id": rid, "ok": True, **answer})


class _BadRequest(Exception):
    pass


__all__ = ["ResolveSession", "SystemResolver", "Resolver", "LookupNotFound", "LookupFailed", "resolve",
           "cluster_domain", "nameservers", "candidates", "SUBSYSTEM", "MAX_IN_FLIGHT", "MAX_LINE", "LOOKUP_TIMEOUT"]
