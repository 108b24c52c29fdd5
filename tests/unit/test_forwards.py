"""Forwards: which pods are behind a Service port, and which one a new connection uses.

Pure logic over EndpointSlice dicts (as the API server returns them); the e2e test
tests/e2e/test_up_forwards.py runs the unit against the real cluster.
"""
from __future__ import annotations

import pytest

from tpenv.engine.forwards import Backends, backends_from_slices, resolve_service_port
from tpenv.errors import NotFound

SERVICE = {"metadata": {"name": "db"},
           "spec": {"ports": [{"name": "sql", "port": 3306, "targetPort": "mysql"},
                              {"name": "metrics", "port": 9104, "targetPort": 9104}]}}


def eslice(name, ports, endpoints):
    return {"metadata": {"name": name},
            "ports": [{"name": n, "port": p} for n, p in ports],
            "endpoints": [{"targetRef": {"kind": "Pod", "name": pod}, "conditions": {"ready": ready}}
                          for pod, ready in endpoints]}


# --- stage 1: the Service port, by number or by name ---------------------------------------------

def test_service_port_by_number_and_by_name():
    assert resolve_service_port(SERVICE, 3306)["name"] == "sql"
    assert resolve_service_port(SERVICE, "3306")["name"] == "sql"
    assert resolve_service_port(SERVICE, "metrics")["port"] == 9104


def test_missing_service_port_names_the_ports_it_has():
    with pytest.raises(NotFound) as e:
        resolve_service_port(SERVICE, 5432)
    assert str(e.value) == "Service 'db' has no port 5432 (it has: sql=3306, metrics=9104)"


# --- stage 2: ready endpoints of the right port, across slices -----------------------------------

def test_backends_take_ready_pods_of_the_named_port_from_every_slice():
    slices = [eslice("db-a", [("sql", 3306), ("metrics", 9104)], [("db-0", True), ("db-1", False)]),
              eslice("db-b", [("sql", 3307)], [("db-2", True)])]
    assert backends_from_slices(slices, SERVICE["spec"]["ports"][0]) == [("db-0", 3306), ("db-2", 3307)]
    assert backends_from_slices(slices, SERVICE["spec"]["ports"][1]) == [("db-0", 9104)]


def test_unnamed_single_port_matches_the_unnamed_slice_port():
    s = {"metadata": {"name": "x"}, "ports": [{"port": 8080}],
         "endpoints": [{"targetRef": {"kind": "Pod", "name": "p"}, "conditions": {}}]}
    assert backends_from_slices([s], {"port": 80, "targetPort": 8080}) == [("p", 8080)]


# --- stage 3: a connection sticks to the current pod and moves when it goes ----------------------

async def test_pick_sticks_then_moves_when_the_pod_leaves():
    b = Backends(SERVICE["spec"]["ports"][0])
    assert b.pick() is None
    b.apply("ADDED", eslice("s", [("sql", 3306)], [("db-1", True), ("db-0", True)]))
    first = b.pick()
    assert first == ("db-0", 3306)
    b.apply("MODIFIED", eslice("s", [("sql", 3306)], [("db-1", True), ("db-0", True), ("db-9", True)]))
    assert b.pick() == first  # still there: no reason to move
    b.apply("MODIFIED", eslice("s", [("sql", 3306)], [("db-1", True), ("db-0", False)]))
    assert b.pick() == ("db-1", 3306)
    assert b.pick(exclude={("db-1", 3306)}) is None
    b.apply("DELETED", eslice("s", [], []))
    assert b.pods == []
