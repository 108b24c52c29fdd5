"""Which connections a direct port-forward carries (tpenv.engine.outbound.direct.endpoints_for,
pure): a Service's ClusterIP and port to its ready endpoint pods with the slice's target port, an
endpoint pod's address to that pod; nothing for what the relay alone may judge (no selector, no
such port, an address outside the allowed ranges such as a hostNetwork pod's node address)."""
from __future__ import annotations

import ipaddress

from tpenv.engine.outbound.direct import NamespaceView, endpoints_for

POD_RANGE = ipaddress.ip_network("10.244.0.0/16")


def allowed(ip) -> bool:
    return ip in POD_RANGE or ip in ipaddress.ip_network("10.96.0.0/16")


def view(*, selector=True, host_network=False) -> NamespaceView:
    v = NamespaceView("shop")
    v.apply("ADDED", {"kind": "Service", "metadata": {"name": "db"},
                      "spec": {"clusterIP": "10.96.0.7", "selector": {"app": "db"} if selector else None,
                               "ports": [{"name": "sql", "port": 3306, "targetPort": "sql"},
                                         {"name": "dns", "port": 53, "protocol": "UDP"}]}})
    node = "192.168.1.5"
    v.apply("ADDED", {"kind": "EndpointSlice", "metadata": {"name": "db-abc",
                                                            "labels": {"kubernetes.io/service-name": "db"}},
                      "ports": [{"name": "sql", "port": 13306}],
                      "endpoints": [
                          {"addresses": [node if host_network else "10.244.0.5"], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": "db-0"}},
                          {"addresses": ["10.244.0.6"], "conditions": {"ready": False},
                           "targetRef": {"kind": "Pod", "name": "db-1"}},
                          {"addresses": ["10.244.0.8"], "conditions": {},
                           "targetRef": {"kind": "Pod", "name": "db-2"}}]})
    return v


def test_cluster_ip_to_ready_endpoints_with_the_target_port():
    got = endpoints_for(view(), ipaddress.ip_address("10.96.0.7"), 3306, allowed)
    assert got == [("db-0", 13306), ("db-2", 13306)]  # db-1 is not ready


def test_pod_address_to_its_pod_on_the_asked_port():
    assert endpoints_for(view(), ipaddress.ip_address("10.244.0.5"), 9000, allowed) == [("db-0", 9000)]


def test_what_the_relay_judges_is_not_taken():
    v = view()
    assert endpoints_for(v, ipaddress.ip_address("10.96.0.7"), 80, allowed) is None  # no such port
    assert endpoints_for(v, ipaddress.ip_address("10.96.0.7"), 53, allowed) is None  # UDP port
    assert endpoints_for(v, ipaddress.ip_address("10.96.0.99"), 3306, allowed) is None  # no such Service
    assert endpoints_for(view(selector=False), ipaddress.ip_address("10.96.0.7"), 3306, allowed) is None
    # A hostNetwork endpoint is a node address: never port-forwarded to (the relay refuses nodes).
    hn = view(host_network=True)
    assert endpoints_for(hn, ipaddress.ip_address("10.96.0.7"), 3306, allowed) == [("db-2", 13306)]
    assert endpoints_for(hn, ipaddress.ip_address("192.168.1.5"), 3306, allowed) is None


def test_a_deleted_slice_leaves_nothing_ready():
    v = view()
    v.apply("DELETED", {"kind": "EndpointSlice", "metadata": {"name": "db-abc"}})
    assert endpoints_for(v, ipaddress.ip_address("10.96.0.7"), 3306, allowed) == []
