"""tpenv connect's names against the real cluster: the outbound core (in this process) with its
resolver answering from the cluster's own DNS through the relay (kube-dns, found as a client
finds it on any cluster), and connections by name and address through the relay.

Stages: (1) the core learns the cluster (ranges, domain, the kube-dns address) from the relay;
(2) every name form Telepresence users type answers, A and AAAA, SRV for a named port, the
headless pod name and kubernetes.default, answered under the asked name; (3) a second lookup
comes from the cache (the cluster is not asked again within the TTL); (4) names outside the
cluster (example.com, the excluded suffixes) are not sent to the cluster; (5) dialling by name
and by address reaches the app, and an address outside the cluster is not sent to the relay.

Cluster-wide (manager install): run under flock /tmp/tpenv-clusterwide.lock.
"""
from __future__ import annotations

import asyncio
import json

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from connect_kit import deploy_apps, manager  # noqa: F401  (module fixture)
from test_webhook_injection import agent_image, cli_env  # noqa: F401  (module fixtures, reused)
from tests.cluster.pytest_plugin import kubectl_json
from tpenv.engine.outbound.core import ConnectOptions, OutboundCore
from tpenv.kits.kube import Kube

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


class Upstream:
    """A stand-in for this machine's nameserver (no query leaves the machine): records the names."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def query(self, wire: bytes) -> bytes:
        q = dns.message.from_wire(wire)
        self.asked.append(q.question[0].name.to_text())
        r = dns.message.make_response(q)
        r.set_rcode(dns.rcode.NXDOMAIN)
        return r.to_wire()


@pytest.fixture
async def core(manager, kubeconfig, namespace):
    kube = await Kube.load(str(kubeconfig))
    try:
        async with OutboundCore(kube, ConnectOptions(namespace=namespace, mapped_namespaces=["kube-system"]),
                                upstream=Upstream()) as c:
            yield c
    finally:
        await kube.close()


async def ask(core, name: str, rdtype: str = "A") -> dns.message.Message:
    host, port = core.resolver_address
    return await dns.asyncquery.udp(dns.message.make_query(name, rdtype), host, port=port, timeout=10)


def addresses(answer: dns.message.Message) -> list[str]:
    return sorted(r.address for rrset in answer.answer for r in rrset if hasattr(r, "address"))


async def test_names_as_the_pods_see_them(core, namespace):
    ns = namespace
    apps = deploy_apps(ns)
    dns_ip = kubectl_json("get", "service", "kube-dns", ns="kube-system")["spec"]["clusterIP"]

    # -- stage 1: what the core learnt from the relay --------------------------------------------
    assert core.cluster_dns == [dns_ip], "the manager pod's nameserver is the kube-dns Service"
    assert "10.96.0.0/16" in map(str, core.cidrs)
    assert core.dns_suffixes[:2] == ["cluster.local", "svc"] and ns in core.dns_suffixes

    # -- stage 2: each name form, under the name asked --------------------------------------------
    for name in ("hello.", f"hello.{ns}.", f"hello.{ns}.svc.", f"hello.{ns}.svc.cluster.local."):
        answer = await ask(core, name)
        assert addresses(answer) == [apps["cluster_ip"]], name
        assert answer.answer[0].name.to_text() == name
    assert addresses(await ask(core, f"web-0.web.{ns}.")) == [apps["web_ip"]]
    assert addresses(await ask(core, "kubernetes.default.")) == ["10.96.0.1"]
    assert addresses(await ask(core, "kube-dns.")) == [dns_ip]  # a mapped namespace's short name
    aaaa = await ask(core, f"hello.{ns}.", "AAAA")
    assert aaaa.rcode() == dns.rcode.NOERROR and not aaaa.answer  # IPv4-only cluster: no data, not an error
    srv = await ask(core, f"_web._tcp.hello.{ns}.", "SRV")
    assert [r.port for rrset in srv.answer for r in rrset] == [80]
    missing = await ask(core, f"nothing-here.{ns}.")
    assert missing.rcode() == dns.rcode.NXDOMAIN

    # -- stage 3: cached for the record's TTL ------------------------------------------------------
    asked = core.resolver.stats["cluster"]
    assert addresses(await ask(core, f"hello.{ns}.")) == [apps["cluster_ip"]]
    assert core.resolver.stats["cluster"] == asked

    # -- stage 4: outside names never reach the cluster -------------------------------------------
    outside = ["example.com.", f"hello.{ns}.com.", "10.0.96.10.in-addr.arpa."]
    for name in outside:
        assert (await ask(core, name)).rcode() == dns.rcode.NXDOMAIN  # the stand-in's answer, passed on
    assert core.resolver.stats["cluster"] == asked
    assert core.upstream.asked == outside

    # -- stage 5: connections by name and by address -------------------------------------------------
    for host, port in (("hello", 80), (f"hello.{ns}", 80), (apps["cluster_ip"], 80), (apps["pod_ip"], 8080),
                       (f"web-0.web.{ns}", 8080)):
        reader, writer = await core.dial(host, port)
        writer.write(f"GET /{host} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200"), (host, raw[:200])
        assert json.loads(raw.partition(b"\r\n\r\n")[2])["path"] == f"/{host}"


async def test_a_user_without_the_relay_right_is_told_which_right(manager, kubeconfig, namespace):
    from test_manager_relay import as_user
    from tpenv.errors import Forbidden

    stranger = await as_user(kubeconfig, "not-a-relay-user")
    try:
        with pytest.raises(Forbidden) as e:
            async with OutboundCore(stranger, ConnectOptions(namespace=namespace), upstream=Upstream()):
                pass
    finally:
        await stranger.close()
    assert "tpenv-relay-client" in (e.value.hint or ""), (str(e.value), e.value.hint)
    assert "cannot" in str(e.value)
