"""The host capture never redirects tpenv's own traffic to the API server (issue 18): the
server's addresses are read from the kube URL and handed to the capture as exclusions."""
from __future__ import annotations

import ipaddress

from tpenv.engine.outbound.unit import api_server_addresses
from tpenv.kits.capture_host import rules


async def test_literal_addresses_are_taken_as_they_are():
    assert await api_server_addresses("https://10.96.0.1:443") == ["10.96.0.1"]
    assert await api_server_addresses("https://[::1]:6443") == ["::1"]


async def test_a_name_is_resolved_and_an_unknown_one_gives_nothing():
    assert "127.0.0.1" in await api_server_addresses("https://localhost:6443")
    assert await api_server_addresses("https://no-such-host.invalid:6443") == []


async def test_the_rules_return_before_redirecting_an_excluded_server_in_a_proxied_range():
    # Stage 1: the API server sits inside the proxied service range.
    exclude = await api_server_addresses("https://10.96.0.1:443")
    out = rules([ipaddress.ip_network("10.96.0.0/16")], 12345, exclude=exclude)
    text = [str(c) for c in out]
    # Stage 2: its exclusion comes before the range's redirect, so its packets never reach the proxy.
    at_exclude = next(i for i, t in enumerate(text) if "10.96.0.1" in t and "return" in t)
    at_redirect = next(i for i, t in enumerate(text) if "redirect" in t)
    assert at_exclude < at_redirect, text


def test_a_nameserver_on_the_api_servers_address_still_goes_to_the_resolver():
    # Stage 1: one machine serves both the API server (6443) and DNS (53), as the laptop
    # namespace of the e2e tests does (and a VM or router can).
    out = [str(c) for c in rules([ipaddress.ip_network("10.96.0.0/16")], 12345, dns_port=5353,
                                 nameservers=["169.254.1.1"], exclude=["169.254.1.1"])]
    # Stage 2: its port 53 is redirected to the resolver before its exclusion returns.
    at_dns = [i for i, t in enumerate(out) if "5353" in t]
    at_exclude = next(i for i, t in enumerate(out) if "169.254.1.1" in t and "return" in t)
    assert len(at_dns) == 2 and max(at_dns) < at_exclude, out
