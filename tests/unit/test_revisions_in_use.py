"""Which ControllerRevisions a StatefulSet still needs when tpenv prunes the agent's history (issue 12)."""
from __future__ import annotations

from typing import Any

from tpenv.engine.agent_removal import revisions_in_use


class FakeKube:
    """Only what revisions_in_use reads: a pod list."""

    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self.pods = pods
        self.core = self

    def list_namespaced_pod(self, *a: Any, **kw: Any) -> None:  # the method passed to call()
        raise AssertionError("called through kube.call only")

    async def call(self, fn: Any, *args: Any, **kw: Any) -> dict[str, Any]:
        return {"items": self.pods}


def sts(update: str, current: str, strategy: dict | None = None) -> dict[str, Any]:
    return {"metadata": {"uid": "u1"}, "spec": {"selector": {"matchLabels": {"app": "db"}},
                                                "updateStrategy": strategy or {"type": "RollingUpdate"}},
            "status": {"updateRevision": update, "currentRevision": current}}


def pod(rev: str, terminating: bool = False) -> dict[str, Any]:
    meta = {"ownerReferences": [{"uid": "u1"}], "labels": {"controller-revision-hash": rev}}
    if terminating:
        meta["deletionTimestamp"] = "2026-12-02T00:00:00Z"
    return {"metadata": meta}


async def test_a_finished_rollout_does_not_keep_the_lagging_current_revision():
    # Every live pod runs the update revision; status.currentRevision has not caught up yet, and
    # the pod that ran the agent is still terminating.
    kube = FakeKube([pod("db-new"), pod("db-agent", terminating=True)])
    assert await revisions_in_use(kube, "ns", sts("db-new", "db-agent")) == {"db-new"}


async def test_a_rollout_in_progress_keeps_what_its_pods_run_and_the_current_revision():
    kube = FakeKube([pod("db-new"), pod("db-agent")])
    assert await revisions_in_use(kube, "ns", sts("db-new", "db-agent")) == {"db-new", "db-agent"}


async def test_a_partition_or_on_delete_keeps_the_current_revision_even_without_its_pods():
    part = {"type": "RollingUpdate", "rollingUpdate": {"partition": 2}}
    assert await revisions_in_use(FakeKube([pod("db-new")]), "ns", sts("db-new", "db-old", part)) == {"db-new", "db-old"}
    assert await revisions_in_use(FakeKube([pod("db-new")]), "ns", sts("db-new", "db-old", {"type": "OnDelete"})) \
        == {"db-new", "db-old"}


async def test_between_the_old_pod_going_and_the_new_one_coming_only_the_update_revision_counts():
    # The one replica's agent pod is terminating and its successor not created yet: the
    # controller will create it from the update revision.
    kube = FakeKube([pod("db-agent", terminating=True)])
    assert await revisions_in_use(kube, "ns", sts("db-new", "db-agent")) == {"db-new"}
