"""endpoints.settled / services_on_port: when the Services on an intercepted port route only to the
agent's pods (pure logic; the e2e test_intercept_ready_routed.py checks it against the cluster)."""
from __future__ import annotations

from tpenv.engine.endpoints import services_on_port, settled


def ep(pod: str, ip: str, ready: bool | None = True, terminating: bool | None = None) -> dict:
    cond = {}
    if ready is not None:
        cond["ready"] = ready
    if terminating is not None:
        cond["terminating"] = terminating
    return {"addresses": [ip], "conditions": cond, "targetRef": {"kind": "Pod", "name": pod}}


def sl(*eps: dict, port: int = 8080, name: str = "web") -> dict:
    return {"ports": [{"name": name, "port": port}], "endpoints": list(eps)}


NEW = {"app-new"}


def test_only_new_ready_pods_is_settled():
    assert settled({"app": [sl(ep("app-new", "10.0.0.2"))]}, NEW, "app", "web", 8080) is None


def test_an_old_ready_pod_is_not_settled_and_named():
    why = settled({"app": [sl(ep("app-new", "10.0.0.2"), ep("app-old", "10.0.0.1"))]}, NEW, "app", "web", 8080)
    assert why and "app-old" in why and "10.0.0.1" in why


def test_an_old_pod_terminating_and_not_ready_is_settled():
    # kube-proxy sends nothing to terminating endpoints while a ready one exists.
    slices = {"app": [sl(ep("app-new", "10.0.0.2"), ep("app-old", "10.0.0.1", ready=False, terminating=True))]}
    assert settled(slices, NEW, "app", "web", 8080) is None


def test_an_old_pod_not_ready_but_not_terminating_is_not_settled():
    slices = {"app": [sl(ep("app-new", "10.0.0.2"), ep("app-old", "10.0.0.1", ready=False))]}
    assert settled(slices, NEW, "app", "web", 8080)


def test_ready_absent_means_ready_as_the_api_says():
    assert settled({"app": [sl(ep("app-old", "10.0.0.1", ready=None))]}, NEW, "app", "web", 8080)
    assert settled({"app": [sl(ep("app-new", "10.0.0.2", ready=None))]}, NEW, "app", "web", 8080) is None


def test_no_ready_new_pod_yet_is_not_settled():
    assert settled({"app": [sl(ep("app-new", "10.0.0.2", ready=False))]}, NEW, "app", "web", 8080)
    assert settled({"app": []}, NEW, "app", "web", 8080)


def test_the_main_service_port_must_be_the_endpoint_port():
    # A targetPort rewrite the slices have not caught up with yet.
    why = settled({"app": [sl(ep("app-new", "10.0.0.2"), port=8080)]}, NEW, "app", "web", 9900)
    assert why and "9900" in why
    # Other Services on the port keep their own port numbers (only membership is checked).
    assert settled({"app": [sl(ep("app-new", "10.0.0.2"), port=9900)],
                    "app-headless": [sl(ep("app-new", "10.0.0.2"), port=8080, name="")]},
                   NEW, "app", "web", 9900) is None


def test_every_service_is_checked():
    slices = {"app": [sl(ep("app-new", "10.0.0.2"))],
              "app-headless": [sl(ep("app-new", "10.0.0.2"), ep("app-old", "10.0.0.1"), name="")]}
    why = settled(slices, NEW, "app", "web", 8080)
    assert why and "app-headless" in why


def svc(name: str, *targets) -> dict:
    return {"metadata": {"name": name}, "spec": {"ports": [{"port": 80, "targetPort": t} for t in targets]}}


def test_services_on_port_picks_those_reaching_the_intercepted_container_port():
    main = svc("app", "http")
    others = [main, svc("by-name", "http"), svc("by-number", 8080), svc("metrics", 9090), svc("agent-name", "tpenv-8080")]
    picked = services_on_port(others, main, main["spec"]["ports"][0], {"http", "tpenv-8080"}, 8080)
    assert [s["metadata"]["name"] for s in picked] == ["app", "by-name", "by-number", "agent-name"]
