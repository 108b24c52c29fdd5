"""Golden-file tests of inject/restore over real-world manifests (agent/tests/golden/<case>/).

Each case: workload.yaml, service.yaml, args.yaml (``ports``: Service ports injected in order,
optional ``container`` and ``settings``), and either expected-workload.yaml + expected-service.yaml
(the Service as it ends up, equal to the input when inject leaves it alone) or, for
``error-*`` cases, expected-error.txt. ``pytest --update-golden`` rewrites the expected files
from the code; review the diff before committing it.
"""
from __future__ import annotations

import copy

import pytest

from tpenv_agent.inject import InjectError, inject, restore


def _inputs(case, golden):
    args = golden.load(case / "args.yaml") or {}
    settings = {**golden.settings, **(args.get("settings") or {})}
    return golden.load(case / "workload.yaml"), golden.load(case / "service.yaml"), args, settings


def _inject_all(workload, service, args, settings):
    """Inject every port of args in order; the Service is the latest patched one (or the input)."""
    for port in args["ports"]:
        workload, patched, _ = inject(workload, service, port, container=args.get("container"), settings=settings)
        service = patched if patched is not None else service
    return workload, service


# --- stage 1: the patched objects are exactly the reviewed golden files ----------------------

def test_inject_matches_golden(golden_ok_case, golden):
    workload, service, args, settings = _inputs(golden_ok_case, golden)
    got_wl, got_svc = _inject_all(workload, service, args, settings)
    if golden.update:
        (golden_ok_case / "expected-workload.yaml").write_text(golden.dump(got_wl))
        (golden_ok_case / "expected-service.yaml").write_text(golden.dump(got_svc))
    assert golden.dump(got_wl) == golden.dump(golden.load(golden_ok_case / "expected-workload.yaml"))
    assert golden.dump(got_svc) == golden.dump(golden.load(golden_ok_case / "expected-service.yaml"))


def test_inject_error_matches_golden(golden_error_case, golden):
    workload, service, args, settings = _inputs(golden_error_case, golden)
    with pytest.raises(InjectError) as info:
        _inject_all(workload, service, args, settings)
    path = golden_error_case / "expected-error.txt"
    if golden.update:
        path.write_text(str(info.value) + "\n")
    assert str(info.value) == path.read_text().rstrip("\n")


def test_service_returned_only_when_changed(golden_ok_case, golden):
    workload, service, args, settings = _inputs(golden_ok_case, golden)
    _, patched, _ = inject(workload, service, args["ports"][0], container=args.get("container"), settings=settings)
    target = next(p for p in service["spec"]["ports"]
                  if p.get("name") == args["ports"][0] or str(p["port"]) == str(args["ports"][0]))
    numeric = str(target.get("targetPort", target["port"])).isdigit()
    # Only the hand-over rewrites a numeric targetPort; the in-pod redirect never touches the Service.
    assert (patched is not None) == (numeric and not settings.get("redirect", True))


# --- stage 2: restore undoes it exactly (same YAML, key order included) ----------------------

def test_restore_undoes_inject_exactly(golden_ok_case, golden):
    workload, service, args, settings = _inputs(golden_ok_case, golden)
    got_wl, got_svc = _inject_all(workload, service, args, settings)
    back_wl, back_svc = restore(got_wl, got_svc)
    assert golden.dump(back_wl) == golden.dump(workload)
    assert golden.dump(back_svc if back_svc is not None else got_svc) == golden.dump(service)


# --- stage 3: idempotence and purity ---------------------------------------------------------

def test_same_port_again_is_a_no_op(golden_ok_case, golden):
    workload, service, args, settings = _inputs(golden_ok_case, golden)
    got_wl, got_svc = _inject_all(workload, service, args, settings)
    for port in args["ports"]:
        again_wl, again_svc, _ = inject(got_wl, got_svc, port, container=args.get("container"), settings=settings)
        assert again_svc is None
        assert golden.dump(again_wl) == golden.dump(got_wl)


def test_inputs_are_never_mutated(golden_case, golden):
    workload, service, args, settings = _inputs(golden_case, golden)
    before = copy.deepcopy((workload, service, args, settings))
    try:
        got_wl, got_svc = _inject_all(workload, service, args, settings)
    except InjectError:
        pass
    else:
        snapshot = copy.deepcopy((got_wl, got_svc))
        restore(got_wl, got_svc)
        assert (got_wl, got_svc) == snapshot
    assert (workload, service, args, settings) == before
