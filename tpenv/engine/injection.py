"""Patch-mode injection, client side: pure glue between tpenv's settings and tpenv_agent.inject.

    plan_injection(workload, service, port, settings, *, container=None, auth_secret_exists=False)
        -> InjectionPlan      what to write to the cluster to have the agent take ``port``
    restore_plan(workload, service) -> RestorePlan      what to write to undo every injection
    auth_secret_manifest(namespace, material) -> dict   the tpenv-auth Secret (docs/protocol.md §2)
    inject_settings(settings) -> dict                   tpenv Settings (or a dict) -> inject's settings

No I/O: the caller (the agent unit of the reconciler) reads the objects, calls these, and
writes the results (workload and Service replaced with their resourceVersion, so a concurrent
edit fails instead of being lost). InjectError is wrapped here into tpenv's PermanentError.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

from tpenv.errors import PermanentError
from tpenv_agent.authkeys import AUTH_KEYS
from tpenv_agent.inject import AGENT_CONTAINER, AUTH_SECRET, InjectError, inject, restore
from tpenv_agent.inpod import VIA_EPHEMERAL, VIA_INIT
from tpenv.settings import Settings

MANAGED_BY = {"app.kubernetes.io/managed-by": "tpenv"}


@dataclass(frozen=True)
class InjectionPlan:
    workload: dict  # the workload to write (equal to the input when unchanged)
    service: dict | None  # the Service to write, None when it stays as it is
    record: dict  # the workload's restore record (also in its tpenv.io/restore annotation)
    workload_changed: bool  # False: the agent already serves this port, nothing to roll out
    needs_auth_secret: bool  # create Secret tpenv-auth in the namespace before the pods start


@dataclass(frozen=True)
class RestorePlan:
    workload: dict
    service: dict | None  # None when the Service carries no tpenv change
    workload_changed: bool


def inject_settings(settings: Settings | dict) -> dict:
    """inject()'s settings from tpenv's Settings model (``settings.agent``) or a plain dict."""
    if isinstance(settings, dict):
        return dict(settings)
    agent = settings.agent
    return {"agent_image": agent.image, "image_pull_policy": agent.image_pull_policy,
            "lease": max(1, round(float(agent.lease_seconds))), "resources": agent.resources(),
            "ssh_port": agent.ssh_port, "health_port": agent.health_port,
            "redirect_via": VIA_EPHEMERAL if agent.redirect_via == "ephemeral-container" else VIA_INIT}


def _wrapped(e: InjectError, what: str) -> PermanentError:
    return PermanentError(f"cannot {what}: {e}",
                          hint="fix the workload or Service as the message says, or choose another port")


def plan_injection(workload: dict, service: dict, port: str | int, settings: Settings | dict, *,
                   container: str | None = None, auth_secret_exists: bool = False,
                   redirect: tuple[bool, str] = (True, ""), via: str | None = None) -> InjectionPlan:
    """``redirect``: (whether a new injection may use the in-pod redirect, why not); ``via``: how
    it is installed (``ephemeral`` or ``init``), when the caller checked more than the settings
    say (redirect.redirect_via). An agent already injected keeps the mode and way its record names."""
    wanted = {**inject_settings(settings), "redirect": redirect[0], "redirect_off": redirect[1]}
    if via is not None:
        wanted["redirect_via"] = via
    try:
        new_wl, new_svc, record = inject(workload, service, port, container=container, settings=wanted)
    except InjectError as e:
        name = (workload.get("metadata") or {}).get("name", "?")
        raise _wrapped(e, f"inject the agent into {workload.get('kind', 'workload')}/{name}") from e
    return InjectionPlan(workload=new_wl, service=new_svc, record=record,
                         workload_changed=new_wl != workload, needs_auth_secret=not auth_secret_exists)


def restore_plan(workload: dict, service: dict | None) -> RestorePlan:
    try:
        new_wl, new_svc = restore(workload, service)
    except InjectError as e:
        name = (workload.get("metadata") or {}).get("name", "?")
        raise _wrapped(e, f"restore {workload.get('kind', 'workload')}/{name}") from e
    return RestorePlan(workload=new_wl, service=new_svc, workload_changed=new_wl != workload)


def runs_agent(pod: dict) -> bool:
    """Whether the pod (as the API returns it, a dry run's answer too) has tpenv's agent container."""
    return any(c.get("name") == AGENT_CONTAINER for c in (pod.get("spec") or {}).get("containers") or [])


def auth_secret_manifest(namespace: str, material: dict[str, bytes]) -> dict:
    """Secret tpenv-auth of protocol §2 from ``material`` (tpenv.kits.agent_client.make_auth_material())."""
    missing = [k for k in AUTH_KEYS if k not in material]
    if missing:
        raise ValueError(f"auth material lacks {', '.join(missing)}")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": AUTH_SECRET, "namespace": namespace, "labels": dict(MANAGED_BY)},
        "data": {k: base64.b64encode(material[k]).decode("ascii") for k in AUTH_KEYS},
    }


__all__ = ["InjectionPlan", "RestorePlan", "plan_injection", "restore_plan", "auth_secret_manifest",
           "inject_settings"]
