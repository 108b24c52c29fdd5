"""kubelet.py's pure parts: which requests are the kubelet's probes, which addresses it probed from."""
from __future__ import annotations

from tpenv_agent.kubelet import KubeletPeers, is_probe
from tpenv_agent.registry import Intercept, Match, PortSpec, Registry


def test_a_probe_is_known_by_the_kubelets_user_agent_only():
    assert is_probe({b"user-agent": [b"kube-probe/1.34"]})
    assert is_probe({b"user-agent": [b"curl/8", b"kube-probe/1.30"]})  # any of its values
    assert not is_probe({b"user-agent": [b"Mozilla/5.0 kube-probe/1.34"]})
    assert not is_probe({b"x-user-agent": [b"kube-probe/1.34"]})
    assert not is_probe({})


def test_peers_are_addresses_bounded_and_ipv4_mapped_is_ipv4():
    peers = KubeletPeers()
    assert ("10.244.0.1", 80) not in peers
    peers.saw_probe(("::ffff:10.244.0.1", 5000, 0, 0))  # a dual-stack socket's view of IPv4
    assert ("10.244.0.1", 1234) in peers and ("::ffff:10.244.0.1", 1, 0, 0) in peers
    for i in range(2, 7):
        peers.saw_probe((f"10.0.0.{i}", 1))
    assert len(peers) == 4 and ("10.244.0.1", 1) not in peers  # the oldest went
    peers.saw_probe(None)  # a unix socket or a closed transport: ignored
    assert len(peers) == 4 and None not in peers


def test_routing_never_gives_a_probe_to_an_intercept_or_a_mirror():
    reg = Registry([PortSpec(9000, 8080, "http")])
    port = reg.ports[0]
    holder = reg.add(Intercept("s1:all", "s1", port, None, ("tpenv", 1), owner=object()))
    rule = reg.add(Intercept("s2:web", "s2", port, Match({"path": {"prefix": "/"}}), ("tpenv", 2), owner=object()))
    copy = reg.add(Intercept("s3:m", "s3", port, None, ("tpenv", 3), owner=object(), mirror=True))
    probe, other = {b"user-agent": [b"kube-probe/1.34"]}, {b"user-agent": [b"curl/8"]}
    assert reg.route_request(port, other, b"/ready") is rule
    assert reg.route_request(port, probe, b"/ready") is None
    assert reg.mirrors(port, other, b"/ready") == [copy]
    assert reg.mirrors(port, probe, b"/ready") == []
    # With the rule gone, the all-TCP holder takes everything but the probe.
    reg.remove("s2:web", force=True)
    assert reg.route_request(port, other, b"/ready") is holder
    assert reg.route_request(port, probe, b"/ready") is None
