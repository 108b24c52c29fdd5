"""Whether a new injection can use the in-pod redirect in this namespace (docs/design.md, Injection).

    await redirect_choice(kube, w, settings, container) -> (True, "") | (False, why)

The redirect needs an init container with NET_ADMIN. Two things can forbid it, both checked
before anything changes: the namespace's Pod Security label (``pod-security.kubernetes.io/
enforce`` baseline or restricted), and any other admission the cluster runs (a cluster-wide
Pod Security default, a policy engine), found by a server-side dry-run of a pod carrying the
init container. Either way the injection falls back to the port hand-over and the caller says
which paths that cannot take. A workload already injected keeps the mode its record names.

    await redirect_via(kube, w, settings) -> VIA_EPHEMERAL | VIA_INIT

How the redirect is installed (setting ``agent.redirect_via``): as an ephemeral container tpenv
adds to each running pod (ephemeral.py), when this user may patch ``pods/ephemeralcontainers``
here (one SelfSubjectAccessReview), else as the init container.
"""
from __future__ import annotations

import copy
from typing import Any

from tpenv.errors import Forbidden, NotFound, TpenvError, UsageError
from tpenv.engine.injection import inject_settings
from tpenv.kits.aio import unit_logger
from tpenv.kits.kube import Kube, What, Workload
from tpenv_agent.inject import ANN_RESTORE
from tpenv_agent.inpod import VIA_EPHEMERAL, VIA_INIT, init_container, redirect_allowed
from tpenv.settings import Settings


async def redirect_choice(kube: Kube, w: Workload, settings: Settings | dict,
                          container: str | None) -> tuple[bool, str]:
    if ANN_RESTORE in (w.obj["metadata"].get("annotations") or {}):
        return True, ""  # the record decides (plan_injection ignores the choice then)
    log = unit_logger("agent", f"{w.namespace}/{w.name}")
    try:
        ns = await kube.call(kube.core.read_namespace, w.namespace, what=What("get", "namespaces", None, w.namespace))
        ok, why = redirect_allowed(w.namespace, ns["metadata"].get("labels"))
        if not ok:
            return ok, why
    except (Forbidden, NotFound) as e:
        log.debug("cannot read namespace %s (%s); the dry run below decides", w.namespace, e)
    return await _admitted(kube, w, settings, log)


async def redirect_via(kube: Kube, w: Workload, settings: Settings | dict) -> str:
    if inject_settings(settings).get("redirect_via") != VIA_EPHEMERAL:
        return VIA_INIT
    from tpenv.engine.doctor.rights import can_i

    log = unit_logger("agent", f"{w.namespace}/{w.name}")
    try:
        if await can_i(kube, w.namespace, "patch", "", "pods", "ephemeralcontainers"):
            return VIA_EPHEMERAL
        why = "no right to patch pods/ephemeralcontainers"
    except TpenvError as e:
        why = f"cannot ask the API server ({e})"
    log.info("the in-pod redirect uses an init container (%s): pods start about a kubelet cycle later", why)
    return VIA_INIT


async def _admitted(kube: Kube, w: Workload, settings: Settings | dict, log: Any) -> tuple[bool, str]:
    """A dry-run pod from the workload's template plus the init container: does admission take it?"""
    tpl = copy.deepcopy((w.obj.get("spec") or {}).get("template") or {})
    spec = tpl.setdefault("spec", {})
    probe = [{"app_port": 1, "agent_port": 7900}]
    spec.setdefault("initContainers", []).append(init_container(probe, {**_defaults(settings)}))
    pod = {"apiVersion": "v1", "kind": "Pod", "spec": spec,
           "metadata": {"generateName": f"{w.name}-tpenv-check-", "namespace": w.namespace,
                        "labels": (tpl.get("metadata") or {}).get("labels") or {},
                        "annotations": (tpl.get("metadata") or {}).get("annotations") or {}}}
    try:
        await kube.call(kube.core.create_namespaced_pod, w.namespace, pod, dry_run="All",
                        what=What("create", "pods", w.namespace))
    except Forbidden as e:
        if "cannot create resource" in e.message:  # RBAC: we cannot tell; the redirect is the default
            log.debug("no right to dry-run a pod in %s; assuming the redirect is admitted", w.namespace)
            return True, ""
        return False, f"the cluster's admission refuses the in-pod redirect's init container ({_reason(e.message)})"
    except UsageError as e:
        return False, f"the API server refuses the in-pod redirect's init container ({_reason(e.message)})"
    return True, ""


def _defaults(settings: Settings | dict) -> dict:
    from tpenv_agent.inject import default_settings

    merged = default_settings()
    merged.update({k: v for k, v in inject_settings(settings).items() if v is not None})
    return merged


def _reason(message: str) -> str:
    # "forbidden: cannot create pods in namespace 'x' (pods "..." is forbidden: violates PodSecurity ...)"
    inner = message.split("(", 1)[1].rstrip(")") if "(" in message else message
    return inner[:300]
