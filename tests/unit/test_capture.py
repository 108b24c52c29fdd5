"""Pure parts of the connect captures: the nftables rules of the host capture, the namespace's
resolver files, the diagnosis of disabled user namespaces, CIDR parsing."""
from __future__ import annotations

import ipaddress

import pytest

from tpenv.errors import UsageError
from tpenv.kits.capture import MARK, contains, networks
from tpenv.kits.capture_host import rules
from tpenv.kits.capture_ns import nsswitch_conf, resolv_conf, userns_problem


def test_rules_skip_marked_then_redirect_dns_then_skip_excluded_then_redirect_the_cluster():
    cmds = rules(networks(["10.96.0.0/16", "10.244.0.0/24"]), 4321, dns_port=5353, nameservers=["10.0.0.53"],
                 exclude=["10.244.0.1/32"])
    chain = cmds[0]["add"]["chain"]
    assert (chain["type"], chain["hook"], chain["table"]) == ("nat", "output", "tpenv")
    exprs = [c["add"]["rule"]["expr"] for c in cmds[1:]]
    # Order matters: our own marked sockets pass first; DNS to the nameservers is the resolver's
    # even where a nameserver shares the API server's address; the excluded API server passes
    # before the cluster's redirect.
    assert exprs[0] == [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": MARK}}, {"return": None}]
    dns = exprs[1:3]
    assert [e[1]["match"]["left"]["payload"]["protocol"] for e in dns] == ["udp", "tcp"]
    assert all(e[0]["match"]["right"] == {"set": [{"prefix": {"addr": "10.0.0.53", "len": 32}}]} for e in dns)
    assert all(e[-1] == {"redirect": {"port": 5353}} for e in dns)
    assert exprs[3][0]["match"]["right"] == {"set": [{"prefix": {"addr": "10.244.0.1", "len": 32}}]}
    assert exprs[3][1] == {"return": None}
    assert exprs[4][0]["match"]["right"]["set"] == [{"prefix": {"addr": "10.96.0.0", "len": 16}},
                                                    {"prefix": {"addr": "10.244.0.0", "len": 24}}]
    assert exprs[4][-1] == {"redirect": {"port": 4321}}


def test_rules_without_dns_or_exclusions_have_only_the_mark_and_the_redirect():
    exprs = [c["add"]["rule"]["expr"] for c in rules(networks(["10.96.0.0/16"]), 1)[1:]]
    assert len(exprs) == 2 and exprs[1][-1] == {"redirect": {"port": 1}}


def test_networks_name_the_bad_cidr():
    assert networks(["10.0.0.0/8"]) == [ipaddress.ip_network("10.0.0.0/8")]
    with pytest.raises(UsageError, match="bad CIDR '10.0.0.1/8'"):
        networks(["10.0.0.1/8"])
    assert contains(networks(["10.96.0.0/16"]), "10.96.3.4")
    assert not contains(networks(["10.96.0.0/16"]), "10.97.0.1")
    assert not contains(networks(["10.96.0.0/16"]), "::1")


@pytest.mark.parametrize("setting, value, says", [
    ("kernel/unprivileged_userns_clone", "0", "sudo sysctl -w kernel.unprivileged_userns_clone=1"),
    ("user/max_user_namespaces", "0", "sudo sysctl -w user.max_user_namespaces=15000"),
    ("kernel/apparmor_restrict_unprivileged_userns", "1", "kernel.apparmor_restrict_unprivileged_userns=0"),
])
def test_userns_problem_names_the_setting_and_the_fix(tmp_path, setting, value, says):
    assert userns_problem(tmp_path) is None
    (tmp_path / setting).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / setting).write_text(value + "\n")
    assert says in userns_problem(tmp_path)
    (tmp_path / setting).write_text("1\n" if value == "0" else "0\n")
    assert userns_problem(tmp_path) is None


def test_the_namespace_resolver_files(tmp_path):
    host = tmp_path / "resolv.conf"
    host.write_text("nameserver 10.0.0.53\nnameserver 10.0.0.54\nsearch corp.example\noptions ndots:2\n")
    conf = resolv_conf(host)
    assert [ln for ln in conf.splitlines() if ln.startswith("nameserver")] == ["nameserver 127.0.0.1"]
    assert "search corp.example" in conf and "options ndots:2" in conf
    # The cluster's search domains first, as in a pod, then the machine's.
    conf = resolv_conf(host, search=["shop.svc.cluster.local", "svc.cluster.local"])
    assert "search shop.svc.cluster.local svc.cluster.local corp.example" in conf
    ns = tmp_path / "nsswitch.conf"
    ns.write_text("passwd: files systemd\nhosts: files mdns4_minimal [NOTFOUND=return] resolve dns myhostname\n")
    out = nsswitch_conf(ns)
    assert "passwd: files systemd" in out and [ln for ln in out.splitlines() if ln.startswith("hosts:")] == [
        "hosts: files dns"]
    assert nsswitch_conf(tmp_path / "missing").strip() == "hosts: files dns"


def test_the_iptables_fallback_rules_mirror_the_nft_ones():
    from tpenv.kits.capture_iptables import rules as ipt_rules

    out = ipt_rules(networks(["10.96.0.0/16"]), 4321, dns_port=5353, nameservers=["10.0.0.53", "fe80::1"],
                    exclude=["10.96.0.1"], mark=MARK)
    assert out[0] == ["-m", "mark", "--mark", hex(MARK), "-j", "RETURN"]
    assert out[1:3] == [["-d", "10.0.0.53/32", "-p", p, "--dport", "53", "-j", "REDIRECT", "--to-ports", "5353"]
                        for p in ("udp", "tcp")]  # IPv6 nameservers are not redirected (IPv4 capture)
    assert out[3] == ["-d", "10.96.0.1/32", "-j", "RETURN"]
    assert out[4] == ["-d", "10.96.0.0/16", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "4321"]
