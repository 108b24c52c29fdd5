"""The manager's reports, with a recording stand-in for the API (no cluster): Pod Security read
once per namespace and cached, a refused pod's Events on the pod and on the Deployment behind
its ReplicaSet, and the watch window each refusal extends (real Event objects are the e2e
test's job)."""
from __future__ import annotations

import asyncio
import json
import threading

from tpenv_agent.reporting import REPORTED_KEPT, Policies, Refusals, event


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


def test_each_pod_is_reported_once_and_the_record_stays_bounded():
    refusals = Refusals(Api({}))
    assert refusals.first_report("p-0") and not refusals.first_report("p-0")
    assert not refusals.first_report(None)
    for i in range(1, REPORTED_KEPT + 10):
        assert refusals.first_report(f"p-{i}")
    assert len(refusals.reported) == REPORTED_KEPT
    # the oldest were forgotten, the newest are still known
    assert "p-0" not in refusals.reported and not refusals.first_report(f"p-{REPORTED_KEPT + 9}")


def test_event_message_is_bounded():
    e = event("ns", {"kind": "Pod", "apiVersion": "v1", "name": "p", "uid": "u"}, "x" * 5000)
    assert len(e["message"]) == 1024


def watched():
    """Refusals with a 60 s window on a clock the test moves (each test replaces the watch
    stream); returns (refusals, the clock, the watch paths the stand-in stream records)."""
    now = [0.0]
    return Refusals(Api({}), window=60.0, clock=lambda: now[0]), now, []


def test_a_refusal_during_a_watch_extends_the_window():
    # A pod refused 50 s into a 60 s watch may be created after that watch ends (its name comes
    # after admission): the window restarts at each refusal, so a second watch covers it.
    refusals, now, paths = watched()
    gate = threading.Event()

    def stream(path, namespace, timeout):
        paths.append(path)
        if len(paths) == 1:
            assert gate.wait(10), "the test never let the first watch end"
            now[0] = 60.0  # the first watch's server-side timeout: the first refusal's window is over
        else:
            now[0] = 200.0  # the second watch runs to the end of the extended window

    refusals._stream = stream

    async def scenario():
        refusals.refused("shop")  # t=0: a watch until t=60
        now[0] = 50.0
        refusals.refused("shop")  # t=50, while that watch runs: the end moves to t=110
        gate.set()
        await refusals.watching["shop"]

    asyncio.run(scenario())
    # Stage 1: watched again after the first watch, for what is left of the moved window (50 s).
    assert len(paths) == 2, paths
    assert paths[0].endswith("timeoutSeconds=60") and paths[1].endswith("timeoutSeconds=50"), paths


def test_one_refusal_one_watch_and_a_later_refusal_starts_another():
    refusals, now, paths = watched()

    def stream(path, namespace, timeout):
        paths.append(path)
        now[0] += 60.0  # each watch runs to its server-side timeout

    refusals._stream = stream

    async def scenario():
        refusals.refused("shop")
        await refusals.watching["shop"]
        assert len(paths) == 1  # the window was not moved: no second watch
        refusals.refused("shop")  # after the watch ended: a new one
        await refusals.watching["shop"]

    asyncio.run(scenario())
    assert len(paths) == 2 and all(p.endswith("timeoutSeconds=60") for p in paths), paths
