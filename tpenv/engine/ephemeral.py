"""The in-pod redirect as an ephemeral container: tpenv adds it to each running pod that wants it.

    await add_redirect(kube, pod) -> bool      patch pods/ephemeralcontainers, once per pod
    RedirectSpec / RedirectUnit                the reconciler's kind: a pod of an intercepted
                                               workload that (re)started without its redirect

Why (issue 13, docs/design.md "Injection"): with an init container the kubelet starts the app
only after it has seen the init container end, at its next relist (1 s period), so every
injected pod starts about a second later than the same pod without tpenv. An ephemeral
container starts beside the app (the kubelet starts ephemeral containers first, initialization
or not) and the pod becomes Ready as fast as a plain rollout. Until the rules exist, traffic
reaches the app directly, as through an agent in passthrough; so tpenv counts a pod as serving
an intercept only once its redirect container is in, and not failed (:func:`redirect_added`).

Which pods want it is on the pod itself (annotation ``tpenv.io/redirect: ephemeral``, from the
template), and the container is built from the pod's own agent container, so any tpenv adding
it adds the same one, and a second add is a no-op (the strategic merge keys on the name).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tpenv.errors import Forbidden, NotFound, PermanentError, TransientError, UsageError
from tpenv.engine.units import Key, Notify, TaskUnit, hash_spec
from tpenv.kits.kube import Kube, What
from tpenv_agent.inject import AGENT_CONTAINER
from tpenv_agent.inpod import EPHEMERAL_CONTAINER, ephemeral_redirect, redirect_state

log = logging.getLogger("tpenv.ephemeral")

STRATEGIC = "application/strategic-merge-patch+json"  # merges ephemeralContainers by name
# A busy API server answers a patch with 504 (its request timeout) or drops it: sent again, the
# same container is a no-op if the first one landed after all.
PATCH_ATTEMPTS = 3
_HINT = ("let this user patch pods/ephemeralcontainers in the namespace, or have the redirect installed by an "
         "init container: TPENV_AGENT_REDIRECT_VIA=init-container, then `tpenv uninstall --agent` for the "
         "workload and intercept again")


async def add_redirect(kube: Kube, pod: dict[str, Any]) -> bool:
    """Add the pod's redirect container unless it wants none or has one; False when nothing was
    added (nothing to add, or the pod is gone: its successor gets its own)."""
    container = ephemeral_redirect(pod, AGENT_CONTAINER)
    if container is None:
        return False
    name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
    for attempt in range(PATCH_ATTEMPTS):
        try:
            await kube.call(kube.core.patch_namespaced_pod_ephemeralcontainers, name, namespace,
                            {"spec": {"ephemeralContainers": [container]}}, _content_type=STRATEGIC,
                            what=What("patch", "pods/ephemeralcontainers", namespace, name))
            return True
        except NotFound:
            return False
        except (Forbidden, UsageError) as e:  # RBAC, admission (a policy refusing NET_ADMIN), an old server
            raise PermanentError(f"cannot add the in-pod redirect ({EPHEMERAL_CONTAINER}) to pod {name}: "
                                 f"{e.message}", hint=_HINT) from e
        except TransientError as e:
            if attempt == PATCH_ATTEMPTS - 1:
                raise
            log.info("[redirect/%s] %s; sending it again in %.0f s", name, e.message, e.retry_after)
            await asyncio.sleep(e.retry_after)
    return True  # not reached: the loop returns or raises


def redirect_added(pod: dict[str, Any]) -> bool:
    """Whether the pod may serve an intercept as far as its redirect goes: it installs none this
    way, or its container is in and has not failed. Not "has run": the kubelet reports the
    container's end only at its next relist (1 s period), up to a second after the pod is Ready,
    while the rules exist a few hundred milliseconds after it starts. What proves the redirect
    is the route probe after a rollout (routeready.py: fresh connections to the Service reach
    the agents); a headless Service has none, so there tpenv waits for "done" (intercepts.py)."""
    return redirect_state(pod)[0] in ("none", "running", "done")


def redirect_failure(pod: dict[str, Any]) -> str | None:
    """Why the pod's redirect container failed, in a sentence; None when it did not."""
    state, detail = redirect_state(pod)
    if state != "failed":
        return None
    name = pod["metadata"]["name"]
    return (f"the in-pod redirect failed in pod {name} ({detail}); see: kubectl logs {name} -c "
            f"{EPHEMERAL_CONTAINER}")


@dataclass(frozen=True)
class RedirectSpec:
    """Desired: pod ``pod`` gets its redirect container (or, with ``failure``, says why it has none)."""

    kube: Kube = field(compare=False, repr=False)
    pod: dict[str, Any] = field(compare=False, repr=False)
    failure: str | None = None

    @property
    def key(self) -> Key:
        meta = self.pod["metadata"]
        return ("redirect", meta["namespace"], meta["name"])

    @property
    def spec_hash(self) -> str:
        return hash_spec(self.pod["metadata"]["uid"], self.failure)

    @property
    def depends_on(self) -> frozenset[Key]:
        return frozenset()

    def create(self, notify: Notify) -> "RedirectUnit":
        return RedirectUnit(self, notify)


class RedirectUnit(TaskUnit):
    """Adds the container, then idles until the pod shows it (the key leaves the desired set) or
    the pod goes; a failed redirect is a permanent failure naming its cause."""

    def __init__(self, spec: RedirectSpec, notify: Notify) -> None:
        super().__init__(spec.key, spec.spec_hash, notify)
        self.spec = spec

    async def run(self, stopping: asyncio.Event, ready: Callable[[], None]) -> None:
        if self.spec.failure:
            raise PermanentError(self.spec.failure, hint="the intercept skips this pod until it is replaced")
        if await add_redirect(self.spec.kube, self.spec.pod):
            self.log.info("added the in-pod redirect to pod %s", self.spec.pod["metadata"]["name"])
        ready()
        await stopping.wait()


def redirect_specs(kube: Kube, pods: list[dict[str, Any]]) -> dict[Key, RedirectSpec]:
    """The redirect units wanted for ``pods`` (live pods running the agent): one per pod whose
    redirect is missing or failed."""
    out: dict[Key, RedirectSpec] = {}
    for pod in pods:
        state, _ = redirect_state(pod)
        if state in ("missing", "failed") and not pod["metadata"].get("deletionTimestamp"):
            spec = RedirectSpec(kube, pod, redirect_failure(pod))
            out[spec.key] = spec
    return out


__all__ = ["add_redirect", "redirect_added", "redirect_failure", "redirect_specs", "RedirectSpec", "RedirectUnit", "STRATEGIC"]
