"""`uninstall --agent` survives a controller writing the workload between our read and our
update (HTTP 409): it reads the object again and redoes the restore (the CI failure of
test_agent_image_setting, where a rollout's status write raced the restore)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tpenv.engine.agent_removal import UPDATE_ATTEMPTS, remove_agent
from tpenv.errors import UpdateConflict
from tpenv.kits.kube import Workload
from tpenv_agent.inject import AGENT_CONTAINER

GOLDEN = Path(__file__).resolve().parents[2] / "agent" / "tests" / "golden" / "redirect-deployment-named-port"


def injected() -> dict[str, Any]:
    return YAML(typ="safe").load((GOLDEN / "expected-workload.yaml").read_text())


class FakeKube:
    """A workload store whose first ``conflicts`` updates are refused as stale."""

    def __init__(self, obj: dict[str, Any], conflicts: int) -> None:
        self.obj, self.conflicts, self.puts, self.reloads = obj, conflicts, [], 0

    async def services_for(self, w: Workload) -> list[dict[str, Any]]:
        return []

    async def reload(self, w: Workload) -> Workload:
        self.reloads += 1
        return Workload(w.kind, w.name, w.namespace, copy.deepcopy(self.obj))

    async def replace_workload(self, w: Workload, obj: dict[str, Any], **kw: Any) -> Workload:
        if self.conflicts:
            self.conflicts -= 1
            raise UpdateConflict("update deployments 'hello': conflict (the object has been modified)")
        self.puts.append(obj)
        self.obj = obj
        return Workload(w.kind, w.name, w.namespace, obj)


def workload(obj: dict[str, Any]) -> Workload:
    return Workload("Deployment", obj["metadata"]["name"], "ns", copy.deepcopy(obj))


async def test_a_conflict_is_read_again_and_redone():
    kube = FakeKube(injected(), conflicts=2)
    assert await remove_agent(kube, workload(kube.obj))
    assert kube.reloads == 2 and len(kube.puts) == 1
    containers = kube.puts[0]["spec"]["template"]["spec"]["containers"]
    assert AGENT_CONTAINER not in [c["name"] for c in containers]


async def test_conflicts_without_end_are_reported():
    kube = FakeKube(injected(), conflicts=UPDATE_ATTEMPTS)
    with pytest.raises(UpdateConflict):
        await remove_agent(kube, workload(kube.obj))
    assert kube.puts == [] and kube.reloads == UPDATE_ATTEMPTS - 1
