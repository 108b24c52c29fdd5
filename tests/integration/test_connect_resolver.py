"""tpenv's local resolver over real sockets: a DnsServer (UDP and TCP on 127.0.0.1) in front of
the Resolver, which asks a stand-in cluster DNS (another DnsServer answering a small zone, reached
over one pipelined TCP stream as the relay carries it) and a stand-in upstream nameserver.

What it shows: cluster names answered under the asked name, cached for the record TTL (the
stand-in sees one query), short names searched through the namespaces in order, names outside
the cluster sent upstream byte for byte, a missing svc.ns said NXDOMAIN without leaking it.
"""
from __future__ import annotations

import asyncio

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from tpenv.kits.dns_names import NameRules
from tpenv.kits.dns_resolver import Resolver
from tpenv.kits.dns_server import DnsServer
from tpenv.kits.dns_upstream import StreamDns, Upstream

ZONE = {  # (name, type) -> (ttl, values): what the stand-in cluster DNS knows
    ("hello.shop.svc.cluster.local.", "A"): (30, ["10.96.0.20"]),
    ("hello.shop.svc.cluster.local.", "AAAA"): (30, ["fd00::20"]),
    ("db.default.svc.cluster.local.", "A"): (5, ["10.96.0.30"]),
    ("db.shop.svc.cluster.local.", "A"): (5, ["10.96.0.31"]),
    ("web-0.web.shop.svc.cluster.local.", "A"): (30, ["10.244.0.7"]),
    ("_http._tcp.hello.shop.svc.cluster.local.", "SRV"): (30, ["0 100 80 hello.shop.svc.cluster.local."]),
}


class Recorder:
    """A DNS server's answer function that records the names it was asked."""

    def __init__(self, answer) -> None:
        self.asked: list[str] = []
        self._answer = answer

    async def __call__(self, wire: bytes) -> bytes:
        q = dns.message.from_wire(wire)
        self.asked.append(q.question[0].name.to_text())
        return self._answer(q).to_wire()


def cluster_answer(q: dns.message.Message) -> dns.message.Message:
    r = dns.message.make_response(q)
    name, rdtype = q.question[0].name.to_text().lower(), dns.rdatatype.to_text(q.question[0].rdtype)
    if (name, rdtype) in ZONE:
        ttl, values = ZONE[(name, rdtype)]
        r.answer.append(dns.rrset.from_text_list(name, ttl, "IN", rdtype, values))
    elif not any(n == name for n, _ in ZONE):
        r.set_rcode(dns.rcode.NXDOMAIN)
    return r


def upstream_answer(q: dns.message.Message) -> dns.message.Message:
    r = dns.message.make_response(q)
    if q.question[0].rdtype == dns.rdatatype.A:
        r.answer.append(dns.rrset.from_text_list(q.question[0].name, 300, "IN", "A", ["192.0.2.1"]))
    return r


@pytest.fixture
async def world():
    cluster, upstream = Recorder(cluster_answer), Recorder(upstream_answer)
    async with DnsServer(cluster) as cluster_srv, DnsServer(upstream) as upstream_srv:
        host, port = cluster_srv.address
        stream = StreamDns(lambda: asyncio.open_connection(host, port))
        rules = NameRules(["shop", "default"], namespaces={"shop", "default"})
        resolver = Resolver(rules, cluster=stream.query,
                            upstream=Upstream([upstream_srv.address[0]], port=upstream_srv.address[1]).query)
        async with DnsServer(resolver.answer, fast=resolver.answer_now) as local:
            local.resolver = resolver
            yield local, cluster, upstream
        stream.close()
        await stream.wait_closed()


async def ask(server: DnsServer, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    send = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
    return await send(q, server.address[0], port=server.address[1], timeout=5)


# --- stage 1: cluster names, under the name asked, over UDP and TCP ------------------------------

async def test_cluster_names_answered_under_the_asked_name(world):
    local, cluster, upstream = world
    r = await ask(local, "hello.shop.")
    assert r.answer[0].name.to_text() == "hello.shop." and r.answer[0][0].address == "10.96.0.20"
    r = await ask(local, "hello.shop.svc.cluster.local.", "AAAA", tcp=True)
    assert r.answer[0][0].address == "fd00::20"
    r = await ask(local, "web-0.web.shop.")
    assert r.answer[0][0].address == "10.244.0.7"
    r = await ask(local, "_http._tcp.hello.shop.", "SRV")
    assert r.answer[0][0].port == 80
    assert upstream.asked == []


async def test_short_names_search_namespaces_in_order(world):
    local, cluster, _ = world
    r = await ask(local, "db.")
    assert r.answer[0][0].address == "10.96.0.31"  # shop first
    r = await ask(local, "hello.")
    assert r.answer[0][0].address == "10.96.0.20"


# --- stage 2: the cache follows the record TTL ----------------------------------------------------

async def test_answers_are_cached_for_their_ttl(world):
    local, cluster, _ = world
    first = await ask(local, "hello.shop.")
    again = await ask(local, "hello.shop.")
    assert cluster.asked.count("hello.shop.svc.cluster.local.") == 1
    assert again.answer[0][0].address == "10.96.0.20" and again.answer[0].ttl <= first.answer[0].ttl <= 30


async def test_a_cached_udp_answer_is_sent_from_the_datagram_callback(world):
    local, cluster, _ = world
    # Stage 1: the first question goes to the cluster (a task per datagram).
    await ask(local, "hello.shop.")
    spawned, spawn = [], local._spawn
    local._spawn = lambda coro: (spawned.append(coro), spawn(coro))  # counts the server's tasks
    cached_before = local.resolver.stats["cached"]
    # Stage 2: the same question again, over a real UDP socket: answered from the wire cache
    # without a task (none was spawned for it), with the asker's id.
    q = dns.message.make_query("hello.shop.", "A")
    r = await ask_wire(local, q)
    assert r.id == q.id and r.answer[0][0].address == "10.96.0.20"
    assert local.resolver.stats["cached"] == cached_before + 1 and spawned == []
    assert cluster.asked.count("hello.shop.svc.cluster.local.") == 1


async def ask_wire(server: DnsServer, q: dns.message.Message) -> dns.message.Message:
    return await dns.asyncquery.udp(q, server.address[0], port=server.address[1], timeout=5)


# --- stage 3: what is not the cluster's -----------------------------------------------------------

async def test_outside_names_go_upstream_untouched(world):
    local, cluster, upstream = world
    r = await ask(local, "example.com.")
    assert r.answer[0][0].address == "192.0.2.1"
    assert upstream.asked == ["example.com."] and cluster.asked == []
    r = await ask(local, "printer.")  # no Service of that name: a LAN name, asked upstream after the cluster
    assert r.answer[0][0].address == "192.0.2.1" and upstream.asked[-1] == "printer."


async def test_missing_service_of_a_namespace_is_nxdomain_not_leaked(world):
    local, _, upstream = world
    r = await ask(local, "nope.shop.")
    assert r.rcode() == dns.rcode.NXDOMAIN and upstream.asked == []


# --- stage 4: a repeated question is answered from the reply's bytes -----------------------------

async def test_a_repeated_question_is_replayed_with_its_own_id_until_forgotten():
    asked = []

    async def cluster(q: dns.message.Message) -> dns.message.Message:
        asked.append(q.question[0].name.to_text())
        return cluster_answer(q)

    async def upstream(wire: bytes) -> bytes:
        raise AssertionError("a cluster name went upstream")

    resolver = Resolver(NameRules(["shop"], namespaces={"shop"}), cluster=cluster, upstream=upstream)
    # Stage 1: the first question goes to the cluster; the same one again (another id) does not,
    # and its reply carries its own id and the same records.
    q1, q2 = dns.message.make_query("hello.shop.", "A"), dns.message.make_query("hello.shop.", "A")
    q2.id = (q1.id + 1) % 65536
    r1 = dns.message.from_wire(await resolver.answer(q1.to_wire()))
    r2 = dns.message.from_wire(await resolver.answer(q2.to_wire()))
    assert (r1.id, r2.id) == (q1.id, q2.id) and r1.answer == r2.answer
    assert asked == ["hello.shop.svc.cluster.local."] and resolver.stats["cached"] == 1
    # Stage 2: forgotten (the benchmark's cold lookups), the question goes to the cluster again.
    resolver.forget()
    await resolver.answer(q2.to_wire())
    assert asked == ["hello.shop.svc.cluster.local."] * 2
