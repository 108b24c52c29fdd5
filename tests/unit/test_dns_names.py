"""Which names tpenv's resolver asks the cluster about, under which FQDN, and which it leaves to
the machine's usual resolver (tpenv/kits/dns_names.py; pure logic)."""
from __future__ import annotations

from tpenv.kits.dns_names import NameRules, merge_search


def rules(**kw):
    return NameRules(search=kw.pop("search", ["shop", "default"]), namespaces={"shop", "default", "kube-system"}, **kw)


# --- stage 1: the forms Telepresence users type ------------------------------------------------

def test_short_name_tries_each_search_namespace_in_order():
    assert rules().candidates("db") == ["db.shop.svc.cluster.local", "db.default.svc.cluster.local"]


def test_service_dot_namespace_and_the_svc_pseudo_domain():
    r = rules()
    assert r.candidates("hello.shop") == ["hello.shop.svc.cluster.local"]
    assert r.candidates("hello.shop.svc.") == ["hello.shop.svc.cluster.local"]
    assert r.candidates("kubernetes.default") == ["kubernetes.default.svc.cluster.local"]


def test_headless_pod_names_and_fqdns():
    r = rules()
    assert r.candidates("web-0.web.shop") == ["web-0.web.shop.svc.cluster.local"]
    assert r.candidates("Web-0.Web.Shop.svc.cluster.local.") == ["web-0.web.shop.svc.cluster.local"]
    assert r.candidates("_http._tcp.hello.shop") == ["_http._tcp.hello.shop.svc.cluster.local"]


def test_another_cluster_domain():
    r = rules(cluster_domain="corp.internal")
    assert r.candidates("hello.shop") == ["hello.shop.svc.corp.internal"]
    assert r.candidates("hello.shop.svc.corp.internal") == ["hello.shop.svc.corp.internal"]


# --- stage 2: what is not the cluster's ----------------------------------------------------------

def test_excluded_suffixes_and_unknown_namespaces_go_upstream():
    r = rules()
    for name in ("example.com", "hello.shop.com", "1.0.96.10.in-addr.arpa", "pypi.org", "mirror.yandex.ru",
                 "printer.lan", "hello.nosuchns"):
        assert r.candidates(name) is None, name


def test_excluded_suffixes_are_configurable():
    r = rules(excluded_suffixes=("lan",))
    assert r.candidates("printer.lan") is None
    assert r.candidates("shop.com") is None  # 'com' is no namespace here either
    r.namespaces.add("io")
    assert r.candidates("api.io") == ["api.io.svc.cluster.local"]  # no longer excluded: a namespace named io


def test_an_unknown_two_label_name_asks_for_a_fresh_namespace_list():
    r = rules()
    assert r.needs_namespaces("hello.newns")
    assert not r.needs_namespaces("hello.shop") and not r.needs_namespaces("example.com")


# --- stage 3: what the captures get --------------------------------------------------------------

def test_suffixes_and_search_list():
    r = rules()
    assert r.suffixes[:2] == ["cluster.local", "svc"] and "kube-system" in r.suffixes
    assert r.search_list == ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local"]


def test_merge_search_keeps_order_and_drops_repeats():
    assert merge_search(["wordpress"], ["default"], ["default", "shop", ""]) == ["wordpress", "default", "shop"]
