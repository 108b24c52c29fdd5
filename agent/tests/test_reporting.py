"""The manager's reports, with a recording stand-in for the API (no cluster): Pod Security read
once per namespace and cached, and a refused pod's Events on the pod and on the Deployment
behind its ReplicaSet (real Event objects are the e2e test's job)."""
from __future__ import annotations

import asyncio
import json

from tpenv_agent.reporting import Policies, Refusals, event


class Api:
    def __init__(self, objects: dict[str, dict]) -> None:
        self.objects, self.calls = objects, []

    def __call__(self, method, path, body=None, timeout=10):
        self.calls.append((method, path, body))
        return self.objects.get(path, {})


def test_policy_is_read_once_and_baseline_turns_the_redirect_off():
    api = Api({"/api/v1/namespaces/shop": {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "baseline"}}}})
    policies = Policies(api)

    async def twice():
        return await policies.redirect("shop"), await policies.redirect("shop")

    first, second = asyncio.run(twice())
    assert first == second and first[0] is False and "'baseline'" in first[1]
    assert len(api.calls) == 1


def test_refused_pod_gets_events_on_itself_and_its_deployment():
    api = Api({"/apis/apps/v1/namespaces/shop/replicasets/web-7d9f": {"metadata": {"ownerReferences": [
        {"kind": "Deployment", "apiVersion": "apps/v1", "name": "web", "uid": "d-1", "controller": True}]}}})
    pod = {"metadata": {"name": "web-7d9f-abc", "uid": "p-1", "annotations": {"tpenv.io/not-injected": "no TCP port"},
                        "ownerReferences": [{"kind": "ReplicaSet", "apiVersion": "apps/v1", "name": "web-7d9f",
                                             "uid": "r-1", "controller": True}]}}
    Refusals(api)._report("shop", pod, "no TCP port")
    posted = [b for m, p, b in api.calls if m == "POST"]
    assert [e["involvedObject"]["uid"] for e in posted] == ["p-1", "d-1"]
    for e in posted:
        assert e["reason"] == "AgentNotInjected" and e["type"] == "Warning" and "no TCP port" in e["message"]
        assert e["involvedObject"]["namespace"] == "shop" and e["metadata"]["namespace"] == "shop"
    json.dumps(posted)  # plain JSON for the API server


def test_event_message_is_bounded():
    e = event("ns", {"kind": "Pod", "apiVersion": "v1", "name": "p", "uid": "u"}, "x" * 5000)
    assert len(e["message"]) == 1024
