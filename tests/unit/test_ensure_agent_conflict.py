"""Injection survives another writer changing the workload or the Service between our read and our
update (HTTP 409): it reads both again and redoes the pure plan (the transitions e2e's failure on
main, where a rollout's status write raced the injection), and an API server that does not answer a
write in time (HTTP 504 under load: the write may or may not have landed). The cluster is faked;
the plan is real."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ruamel.yaml import YAML

from tpenv.engine import agents
from tpenv.engine.agents import UPDATE_ATTEMPTS, ensure_agent
from tpenv.errors import ClusterUnreachable, UpdateConflict
from tpenv.kits.kube import Workload
from tpenv.settings import load_settings
from tpenv_agent.inject import AGENT_CONTAINER

# A numeric targetPort without the redirect: both the workload and the Service are written.
GOLDEN = Path(__file__).resolve().parents[2] / "agent" / "tests" / "golden" / "deployment-numeric-port"
SETTINGS = load_settings({"TPENV_AGENT_IMAGE": "tpenv/agent:golden", "TPENV_AGENT_IMAGE_PULL_POLICY": "Never"})


def load(name: str) -> dict[str, Any]:
    return YAML(typ="safe").load((GOLDEN / name).read_text())


class FakeKube:
    """Stores one workload and one Service; the first ``conflicts[kind]`` writes of each are stale."""

    def __init__(self, conflicts: dict[str, int], *, lost: int = 0, landed: bool = False) -> None:
        self.obj, self.svc = load("workload.yaml"), load("service.yaml")
        self.conflicts, self.writes, self.reads = dict(conflicts), {"workload": [], "service": []}, 0
        # The first ``lost`` workload writes get a 504; ``landed``: each was stored all the same.
        self.lost, self.landed = lost, landed
        self.core = SimpleNamespace(replace_namespaced_service=self.put_service,
                                    read_namespaced_service=self.get_service)

    def _refuse(self, kind: str) -> None:
        if self.conflicts.get(kind):
            self.conflicts[kind] -= 1
            raise UpdateConflict(f"update {kind}: conflict (the object has been modified)")

    async def call(self, fn, *args: Any, what: Any, **kw: Any) -> Any:
        return fn(*args, **kw)

    def put_service(self, name: str, ns: str, body: dict, dry_run: str | None = None) -> dict:
        self._refuse("service")
        if dry_run is None:
            self._refuse("service write")  # refused only when it would be stored (after the rollout)
            self.writes["service"].append(body)
            self.svc = copy.deepcopy(body)
        return copy.deepcopy(body)

    def get_service(self, name: str, ns: str) -> dict:
        self.reads += 1
        return copy.deepcopy(self.svc)

    async def reload(self, w: Workload) -> Workload:
        self.reads += 1
        return Workload(w.kind, w.name, w.namespace, copy.deepcopy(self.obj))

    async def replace_workload(self, w: Workload, obj: dict[str, Any], *, dry_run: bool = False) -> Workload:
        self._refuse("workload")
        if not dry_run:
            self._refuse("workload write")  # refused only when it would be stored (after the dry run)
            if self.lost and not self.landed:
                self.lost -= 1
                raise ClusterUnreachable("update deployments: the API server answered 504 (timeout)", retry_after=0.01)
            self.writes["workload"].append(obj)
            self.obj = copy.deepcopy(obj)
            if self.lost:
                self.lost -= 1
                raise ClusterUnreachable("update deployments: the API server answered 504 (timeout)", retry_after=0.01)
        return Workload(w.kind, w.name, w.namespace, copy.deepcopy(obj))


@pytest.fixture(autouse=True)
def no_cluster_waits(monkeypatch):
    """The rollout and endpoint waits watch real pods: out of this unit's reach (e2e covers them)."""
    async def rollout(kube, w, port_name, **kw):
        return w

    async def endpoints(*a, **kw):
        return None

    async def no_redirect(*a, **kw):
        return False, "the namespace forbids it (test)"

    async def via(*a, **kw):
        return "init"

    async def secret(*a, **kw):
        return True

    monkeypatch.setattr(agents, "wait_rollout", rollout)
    monkeypatch.setattr(agents, "wait_endpoints", endpoints)
    monkeypatch.setattr(agents, "redirect_choice", no_redirect)
    monkeypatch.setattr(agents, "redirect_via", via)
    monkeypatch.setattr(agents, "_secret_exists", secret)


def start(kube: FakeKube, **kw):
    w = Workload("Deployment", kube.obj["metadata"]["name"], "ns", copy.deepcopy(kube.obj))
    return ensure_agent(kube, w, copy.deepcopy(kube.svc), kube.svc["spec"]["ports"][0], SETTINGS, progress=lambda t: None,
                        **kw)


async def test_conflicts_on_workload_and_service_are_read_again_and_redone():
    kube = FakeKube({"workload": 2, "service": 2})
    ready = await start(kube)
    # Each object written once, whole: the agent in the workload, the Service on the agent's port.
    assert len(kube.writes["workload"]) == 1 and len(kube.writes["service"]) == 1
    assert AGENT_CONTAINER in [c["name"] for c in kube.obj["spec"]["template"]["spec"]["containers"]]
    assert kube.svc == load("expected-service.yaml")
    assert ready.rolled_out and kube.reads >= 4


async def test_a_conflict_on_the_service_after_the_rollout_is_redone_on_the_rolled_out_workload():
    kube = FakeKube({"service write": 2})
    await start(kube)
    assert len(kube.writes["workload"]) == 1 and len(kube.writes["service"]) == 1
    assert kube.svc == load("expected-service.yaml")


async def test_conflicts_without_end_are_reported_and_nothing_is_written():
    kube = FakeKube({"workload": UPDATE_ATTEMPTS})
    with pytest.raises(UpdateConflict):
        await start(kube)
    assert kube.writes == {"workload": [], "service": []}


async def test_a_write_the_api_server_did_not_answer_is_read_again_and_made_once():
    # Stage 1: the 504'd write was not stored: read again, planned again, written once.
    kube = FakeKube({}, lost=2)
    seen = []
    ready = await start(kube, written=seen.append)
    assert len(kube.writes["workload"]) == 1 and ready.rolled_out and len(seen) == 1
    assert AGENT_CONTAINER in [c["name"] for c in kube.obj["spec"]["template"]["spec"]["containers"]]
    # Stage 2: it was stored before its answer was lost: not written again, and the rollout is
    # still ours (restored on leave, and waited for like any rollout of ours).
    kube = FakeKube({}, lost=1, landed=True)
    seen = []
    ready = await start(kube, written=seen.append)
    assert len(kube.writes["workload"]) == 1 and ready.rolled_out and len(seen) == 1
    # Stage 3: an API server that never answers: the error, after a bounded number of tries.
    kube = FakeKube({}, lost=UPDATE_ATTEMPTS)
    with pytest.raises(ClusterUnreachable):
        await start(kube)
    assert kube.writes == {"workload": [], "service": []}


async def test_a_first_intercept_makes_the_secret_once_across_a_conflict(monkeypatch):
    # The namespace has no tpenv-auth yet, and the first workload write meets a 409: the Secret
    # made before it is there for the retry, which must not make it again.
    from tpenv.engine import tunnels

    made = []

    async def missing(*a, **kw):
        return False

    async def ensure(kube, namespace, *, seen_missing=False):
        made.append((namespace, seen_missing))
        return {}
    monkeypatch.setattr(agents, "_secret_exists", missing)
    monkeypatch.setattr(tunnels, "ensure_auth_material", ensure)
    kube = FakeKube({"workload write": 1})
    ready = await start(kube)
    assert made == [("ns", True)] and len(kube.writes["workload"]) == 1 and ready.rolled_out
