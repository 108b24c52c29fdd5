"""What tpenv's local resolver answers: cluster names from inside the cluster, the rest from the
machine's usual nameservers, untouched (docs/connect.md "Names").

    resolver = Resolver(rules, cluster=StreamDns(...).query, upstream=Upstream())
    async with DnsServer(resolver.answer) as server: ...

A cluster name (``NameRules.candidates``) is asked of the cluster DNS under its FQDN, each
candidate in order until one exists; the answer's records carry the name the client asked for.
Answers are cached for their records' TTL (negative answers for the SOA's minimum, bounded), and
identical questions in flight share one query. A name no candidate knows goes upstream, so a
single-label LAN name still works.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from tpenv.errors import TpenvError
from tpenv.kits.dns_names import NameRules

Ask = Callable[[dns.message.Message], Awaitable[dns.message.Message]]
log = logging.getLogger("tpenv.dns")

NEGATIVE_TTL_MAX = 30.0  # how long "no such name" is believed at most: new Services appear


def _ttl(response: dns.message.Message) -> float:
    if response.answer:
        return float(min(r.ttl for r in response.answer))
    soa = [r for r in response.authority if r.rdtype == dns.rdatatype.SOA]
    if soa:
        return float(min(soa[0].ttl, soa[0][0].minimum, NEGATIVE_TTL_MAX))
    return 5.0


WIRE_CACHE_SECONDS = 1.0
WIRE_CACHE_MAX = 4096


class Resolver:
    """``answer(wire) -> wire``: the DnsServer's callback. ``refresh_namespaces`` (optional): a
    coroutine that updates ``rules.namespaces`` when a name looks like ``svc.ns`` of an unknown
    namespace (at most every ``refresh_every`` seconds)."""

    def __init__(self, rules: NameRules, *, cluster: Ask, upstream: Callable[[bytes], Awaitable[bytes]],
                 refresh_namespaces: Callable[[], Awaitable[None]] | None = None, refresh_every: float = 10.0) -> None:
        self.rules, self._cluster, self._upstream = rules, cluster, upstream
        self._refresh, self._refresh_every, self._refreshed = refresh_namespaces, refresh_every, -1e9
        self._cache: dict[tuple[str, int, int], tuple[float, dns.message.Message]] = {}
        self._inflight: dict[tuple[str, int, int], asyncio.Future] = {}
        self.stats = {"cluster": 0, "cached": 0, "upstream": 0}
        # The fast path of a repeated question: the reply's bytes by the query's bytes past its id,
        # kept at most WIRE_CACHE_SECONDS (TTLs are counted down in whole seconds anyway), so a
        # cached lookup costs a dict lookup and no DNS parsing at all.
        self._wire: dict[bytes, tuple[float, bytes]] = {}

    def forget(self) -> None:
        """Empty every cache (the benchmark's cold lookups)."""
        self._cache.clear()
        self._wire.clear()

    # --- entry point ---------------------------------------------------------------------------
    def answer_now(self, wire: bytes) -> bytes | None:
        """The reply to a repeated question from the wire cache, synchronously (the server sends it
        from its datagram callback: no task, no parsing); None when it is not there."""
        hit = self._wire.get(wire[2:]) if len(wire) > 12 else None
        if hit is not None and hit[0] > time.monotonic():
            self.stats["cached"] += 1
            return wire[:2] + hit[1]
        return None

    async def answer(self, wire: bytes) -> bytes | None:
        if (hit := self.answer_now(wire)) is not None:
            return hit
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not DNS: a server stays silent rather than answer garbage
        if len(query.question) != 1:
            return self._fail(query, dns.rcode.FORMERR)
        q = query.question[0]
        name = q.name.to_text()
        candidates = self.rules.candidates(name)
        if candidates is None and self._refresh is not None and self.rules.needs_namespaces(name):
            await self._refresh_namespaces()
            candidates = self.rules.candidates(name)
        if candidates is not None:
            try:
                found = await self._from_cluster(query, candidates)
            except TpenvError as e:
                log.warning("cluster DNS failed for %s: %s", name, e)
                return self._fail(query, dns.rcode.SERVFAIL)
            if found is not None:
                out = found.to_wire()
                self._remember(wire, found, out)
                return out
        self.stats["upstream"] += 1
        try:
            return await self._upstream(wire)
        except TpenvError as e:
            log.warning("upstream DNS failed for %s: %s", name, e)
            return self._fail(query, dns.rcode.SERVFAIL)

    def _remember(self, wire: bytes, reply: dns.message.Message, out: bytes) -> None:
        ttls = [r.ttl for section in (reply.answer, reply.authority) for r in section]
        if not ttls or min(ttls) < 1:
            return  # nothing to count down from, or expiring now: never replayed
        if len(self._wire) >= WIRE_CACHE_MAX:
            self._wire.clear()  # bounded; refilled by the next questions
        self._wire[wire[2:]] = (time.monotonic() + min(WIRE_CACHE_SECONDS, min(ttls)), out[2:])

    # --- cluster -------------------------------------------------------------------------------
    async def _from_cluster(self, query: dns.message.Message, candidates: list[str]) -> dns.message.Message | None:
        """The answer to ``query`` from the first candidate that exists; None when none does and
        the name may belong to someone else (single label: ask upstream)."""
        q = query.question[0]
        last: dns.message.Message | None = None
        for fqdn in candidates:
            response = await self._ask(fqdn, q.rdtype, q.rdclass)
            last = response
            if response.rcode() != dns.rcode.NXDOMAIN:
                return self._reply(query, fqdn, response)
        if last is not None and len(q.name.labels) > 2:  # svc.ns that does not exist: say so, do not leak it
            return self._reply(query, candidates[-1], last)
        return None

    async def _ask(self, fqdn: str, rdtype: int, rdclass: int) -> dns.message.Message:
        key = (fqdn, rdtype, rdclass)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            self.stats["cached"] += 1
            return hit[1]
        waiting = self._inflight.get(key)
        if waiting is not None:
            return await asyncio.shield(waiting)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            self.stats["cluster"] += 1
            response = await self._cluster(dns.message.make_query(fqdn + ".", rdtype, rdclass))
            if response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                self._cache[key] = (time.monotonic() + _ttl(response), response)
            fut.set_result(response)
            return response
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters re-raise it, nobody warns about it
            raise
        finally:
            self._inflight.pop(key, None)

    def _reply(self, query: dns.message.Message, fqdn: str, response: dns.message.Message) -> dns.message.Message:
        """``response`` (to ``fqdn``) as the answer to ``query``: same id and question, records of
        ``fqdn`` renamed to the asked name, TTLs counting down from the cache."""
        reply = dns.message.make_response(query)
        reply.set_rcode(response.rcode())
        reply.flags |= dns.flags.RA
        asked, wanted = query.question[0].name, dns.name.from_text(fqdn + ".")
        expiry = self._cache.get((fqdn, query.question[0].rdtype, query.question[0].rdclass), (None,))[0]
        left = None if expiry is None else max(0, int(expiry - time.monotonic()))
        for section, out in ((response.answer, reply.answer), (response.authority, reply.authority)):
            for rrset in section:
                copy = dns.rrset.RRset(asked if rrset.name == wanted else rrset.name, rrset.rdclass, rrset.rdtype)
                copy.update(rrset)
                copy.ttl = rrset.ttl if left is None else min(rrset.ttl, left)
                out.append(copy)
        return reply

    async def _refresh_namespaces(self) -> None:
        now = time.monotonic()
        if now - self._refreshed < self._refresh_every:
            return
        self._refreshed = now
        try:
            await self._refresh()  # type: ignore[misc]
        except TpenvError as e:
            log.info("could not refresh the cluster's namespaces: %s", e)

    @staticmethod
    def _fail(query: dns.message.Message, rcode: int) -> bytes:
        reply = dns.message.make_response(query)
        reply.set_rcode(rcode)
        return reply.to_wire()


__all__ = ["Resolver", "NEGATIVE_TTL_MAX"]
