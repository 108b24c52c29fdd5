"""The ephemeral in-pod redirect, client side (tpenv/engine/ephemeral.py): which pods get one,
what the patch sends, how refusals read. The cluster's side is e2e (test_intercept_every_path)."""
from __future__ import annotations

import asyncio
import copy
from types import SimpleNamespace
from typing import Any

import pytest

from tpenv.engine.ephemeral import PATCH_ATTEMPTS, STRATEGIC, RedirectSpec, add_redirect, redirect_added, redirect_specs
from tpenv.errors import ClusterUnreachable, Forbidden, NotFound, PermanentError

AGENT = {"name": "tpenv-agent", "image": "tpenv/agent:9", "imagePullPolicy": "Never",
         "args": ["sidecar", "--container", "app", "--listen", "7900:8080:http", "--listen", "7901:9000:tpenv-9000"]}


def pod(name: str, *, marked: bool = True, added: bool = False, ended: int | None = None,
        terminating: bool = False) -> dict[str, Any]:
    p: dict[str, Any] = {"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}",
                                      "annotations": {"tpenv.io/redirect": "ephemeral"} if marked else {}},
                         "spec": {"containers": [{"name": "app", "image": "app"}, copy.deepcopy(AGENT)]},
                         "status": {}}
    if terminating:
        p["metadata"]["deletionTimestamp"] = "2026-12-03T00:00:00Z"
    if added:
        p["spec"]["ephemeralContainers"] = [{"name": "tpenv-redirect"}]
    if ended is not None:
        p["status"]["ephemeralContainerStatuses"] = [
            {"name": "tpenv-redirect", "state": {"terminated": {"exitCode": ended, "message": "boom"}}}]
    return p


class FakeKube:
    def __init__(self, error: Exception | None = None) -> None:
        self.sent: list[tuple] = []
        self.error = error
        self.core = SimpleNamespace(patch_namespaced_pod_ephemeralcontainers=self.patch)

    def patch(self, name: str, namespace: str, body: dict, _content_type: str) -> dict:
        self.sent.append((name, namespace, body, _content_type))
        if self.error is not None:
            raise self.error
        return {}

    async def call(self, fn, *args: Any, what: Any, **kw: Any) -> Any:
        return fn(*args, **kw)


def test_only_live_pods_missing_or_failing_their_redirect_get_a_unit():
    pods = [pod("missing"), pod("running", added=True), pod("done", added=True, ended=0),
            pod("failed", added=True, ended=2), pod("going", terminating=True), pod("init-way", marked=False)]
    specs = redirect_specs(FakeKube(), pods)
    assert sorted(k[2] for k in specs) == ["failed", "missing"]
    assert specs[("redirect", "ns", "missing")].failure is None
    assert "exit 2: boom" in specs[("redirect", "ns", "failed")].failure
    assert "kubectl logs failed -c tpenv-redirect" in specs[("redirect", "ns", "failed")].failure
    # A pod serves once its redirect is in (the kubelet reports its end a relist later) and not failed.
    assert {p["metadata"]["name"]: redirect_added(p) for p in pods} == {
        "missing": False, "running": True, "done": True, "failed": False, "going": False, "init-way": True}


def test_the_patch_is_a_strategic_merge_of_the_redirect_built_from_the_agent():
    kube = FakeKube()
    assert asyncio.run(add_redirect(kube, pod("p")))
    name, ns, body, content_type = kube.sent[0]
    assert (name, ns, content_type) == ("p", "ns", STRATEGIC)  # merged by name: other ephemeral containers stay
    (c,) = body["spec"]["ephemeralContainers"]
    assert c["name"] == "tpenv-redirect" and c["image"] == "tpenv/agent:9" and c["imagePullPolicy"] == "Never"
    assert c["args"] == ["init", "--redirect", "8080:7900", "--redirect", "9000:7901"]
    # Nothing to add: a pod that has one, or one whose template did not ask.
    assert not asyncio.run(add_redirect(kube, pod("p", added=True)))
    assert not asyncio.run(add_redirect(kube, pod("p", marked=False)))
    assert len(kube.sent) == 1


def test_a_pod_gone_is_nothing_to_do_and_a_refusal_says_what_to_change():
    assert not asyncio.run(add_redirect(FakeKube(NotFound("pods 'p' not found")), pod("p")))
    with pytest.raises(PermanentError) as e:
        asyncio.run(add_redirect(FakeKube(Forbidden("cannot patch resource pods/ephemeralcontainers")), pod("p")))
    assert "tpenv-redirect" in e.value.message and "pods/ephemeralcontainers" in e.value.message
    assert "TPENV_AGENT_REDIRECT_VIA=init-container" in e.value.hint


def test_a_server_timeout_is_sent_again_and_a_lasting_one_is_said():
    # Stage 1: the API server times out twice (its 504), then takes the patch: three sends, added.
    class Flaky(FakeKube):
        def __init__(self, failures: int) -> None:
            super().__init__()
            self.failures = failures

        def patch(self, *args: Any, **kw: Any) -> dict:
            self.error = ClusterUnreachable("the API server answered 504 (Timeout)", retry_after=0) \
                if self.failures > 0 else None
            self.failures -= 1
            return super().patch(*args, **kw)

    kube = Flaky(2)
    assert asyncio.run(add_redirect(kube, pod("p")))
    assert len(kube.sent) == 3 and len({repr(sent) for sent in kube.sent}) == 1  # the same patch each time
    # Stage 2: one that keeps timing out is a transient error after the last attempt.
    kube = Flaky(10)
    with pytest.raises(ClusterUnreachable):
        asyncio.run(add_redirect(kube, pod("p")))
    assert len(kube.sent) == PATCH_ATTEMPTS


def test_the_unit_adds_then_idles_and_a_failed_redirect_fails_it_for_good():
    async def scenario() -> None:
        kube = FakeKube()
        unit = RedirectSpec(kube, pod("p")).create(lambda event: None)
        await unit.start()
        assert len(kube.sent) == 1 and unit.health().state.value == "ready"
        await unit.stop()
        failed = RedirectSpec(kube, pod("p", added=True, ended=1), "the in-pod redirect failed").create(lambda e: None)
        with pytest.raises(PermanentError):
            await failed.start()
        assert len(kube.sent) == 1

    asyncio.run(scenario())
