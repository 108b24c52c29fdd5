"""Replace mode's plan as a pure function, against golden YAML (tests/unit/golden_replace/<case>/).

Each case: workload.yaml, service.yaml, args.yaml (``port``: the Service port, ``session``,
optional ``redirect``: [allowed, why not]) and expected-workload.yaml + expected-patch.yaml, or
for ``error-*`` cases expected-error.txt. ``TPENV_UPDATE_GOLDEN=1`` rewrites the expected files
from the code; review the diff before committing it. The restore patch is applied with a real
RFC 6902 implementation (jsonpatch): it must give back the input exactly.
"""
from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path

import jsonpatch
import pytest
from ruamel.yaml import YAML

from tpenv.engine.replace import plan_replace, render_restore
from tpenv.errors import PermanentError
from tpenv.kits.kube import Workload
from tpenv_agent.replace import ANN_REPLACE, pod_replaced, restore_names

GOLDEN = Path(__file__).parent / "golden_replace"
CASES = sorted(p for p in GOLDEN.iterdir() if (p / "workload.yaml").exists())
OK = [p for p in CASES if not p.name.startswith("error-")]
ERRORS = [p for p in CASES if p.name.startswith("error-")]
SETTINGS = {"agent_image": "tpenv/agent:golden", "image_pull_policy": "Never", "lease": 5}
UPDATE = os.environ.get("TPENV_UPDATE_GOLDEN") == "1"


def load(path: Path):
    return YAML(typ="safe", pure=True).load(path.read_text())


def dump(data) -> str:
    out = io.StringIO()
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.dump(data, out)
    return out.getvalue()


def plan(case: Path):
    args = load(case / "args.yaml")
    redirect = tuple(args.get("redirect") or (True, ""))
    return plan_replace(load(case / "workload.yaml"), load(case / "service.yaml"), args["port"], SETTINGS,
                        session=args["session"], redirect=redirect)


# --- stage 1: the replaced object and its restore patch are the reviewed golden files -------------

@pytest.mark.parametrize("case", OK, ids=[p.name for p in OK])
def test_plan_matches_golden(case):
    got = plan(case)
    if UPDATE:
        (case / "expected-workload.yaml").write_text(dump(got.workload))
        (case / "expected-patch.yaml").write_text(dump(got.patch))
    assert dump(got.workload) == dump(load(case / "expected-workload.yaml"))
    assert dump(got.patch) == dump(load(case / "expected-patch.yaml"))


@pytest.mark.parametrize("case", ERRORS, ids=[p.name for p in ERRORS])
def test_refusal_matches_golden(case):
    with pytest.raises(PermanentError) as info:
        plan(case)
    path = case / "expected-error.txt"
    if UPDATE:
        path.write_text(str(info.value) + "\n")
    assert str(info.value) == path.read_text().rstrip("\n")


# --- stage 2: what the placeholder is, and that the patch undoes everything exactly ---------------

@pytest.mark.parametrize("case", OK, ids=[p.name for p in OK])
def test_every_tcp_port_goes_to_the_agent_and_the_app_does_not_run(case):
    original = load(case / "workload.yaml")
    got = plan(case)
    app_before = original["spec"]["template"]["spec"]["containers"][0]
    app = next(c for c in got.workload["spec"]["template"]["spec"]["containers"] if c["name"] == app_before["name"])
    assert app["command"] == ["tpenv-agent"] and app["args"][0] == "pause"
    assert app["image"] == SETTINGS["agent_image"]
    assert app["ports"] == app_before["ports"] and app.get("env") == app_before.get("env")
    assert app.get("volumeMounts") == app_before.get("volumeMounts")
    assert not {"readinessProbe", "livenessProbe", "startupProbe", "lifecycle", "workingDir"} & set(app)
    tcp = {p["containerPort"] for p in app_before["ports"] if p.get("protocol", "TCP") == "TCP"}
    assert {e["app_port"] for e in got.ports} == tcp
    agent = next(c for c in got.workload["spec"]["template"]["spec"]["containers"] if c["name"] == "tpenv-agent")
    assert agent["args"][-2:] == ["--restore", "/tpenv/restore"]
    # The restore right is mounted into the agent container alone.
    holders = [c["name"] for c in got.workload["spec"]["template"]["spec"]["containers"]
               if any(m["name"] == "tpenv-restore" for m in c.get("volumeMounts") or [])]
    assert holders == ["tpenv-agent"]
    assert pod_replaced({"metadata": got.workload["spec"]["template"]["metadata"]}) == load(case / "args.yaml")["session"]


@pytest.mark.parametrize("case", OK, ids=[p.name for p in OK])
def test_restore_patch_gives_back_the_input_exactly(case):
    original = load(case / "workload.yaml")
    got = plan(case)
    # What the API server adds meanwhile (status, revision annotations) is not the patch's business.
    live = copy.deepcopy(got.workload)
    live.setdefault("status", {})["observedGeneration"] = 7
    back = jsonpatch.apply_patch(live, got.patch)
    back.pop("status")
    assert dump(back) == dump(original)
    # A second application fails its test: whoever restores first wins, the other changes nothing.
    with pytest.raises(jsonpatch.JsonPatchException):
        jsonpatch.apply_patch(back, got.patch)


@pytest.mark.parametrize("case", OK, ids=[p.name for p in OK])
def test_plan_is_pure(case):
    workload, service = load(case / "workload.yaml"), load(case / "service.yaml")
    w0, s0 = copy.deepcopy(workload), copy.deepcopy(service)
    args = load(case / "args.yaml")
    first = plan_replace(workload, service, args["port"], SETTINGS, session=args["session"])
    assert (workload, service) == (w0, s0)
    assert first == plan_replace(workload, service, args["port"], SETTINGS, session=args["session"])


# --- stage 3: the restore right (templates/replace) -----------------------------------------------

def test_restore_right_is_one_workload_one_secret():
    case = GOLDEN / "deployment-two-ports-probes"
    got = plan(case)
    w = Workload("Deployment", "orders", "shop", load(case / "workload.yaml"))
    docs = render_restore("shop", w, {"patch": got.patch}, "CA PEM")
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "Secret"]
    assert {d["metadata"]["name"] for d in docs} == {restore_names("orders")} == {"tpenv-restore-orders"}
    sa, role, binding, secret = docs
    assert sa["automountServiceAccountToken"] is False
    assert role["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["orders"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["tpenv-restore-orders"], "verbs": ["delete"]}]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tpenv-restore-orders", "namespace": "shop"}]
    assert json.loads(secret["stringData"]["restore.json"]) == {"patch": got.patch}
    assert secret["stringData"]["ca.crt"] == "CA PEM" and "token" not in secret["stringData"]
    assert all(d["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tpenv" for d in docs)


def test_long_workload_names_keep_valid_object_names():
    name = restore_names("w" * 63)
    assert len(name) <= 63 and name.startswith("tpenv-restore-") and name != restore_names("w" * 62 + "x")


def test_the_mark_names_the_session():
    got = plan(GOLDEN / "deployment-two-ports-probes")
    assert json.loads(got.workload["metadata"]["annotations"][ANN_REPLACE]) == {"container": "orders",
                                                                                "session": "s-1"}
