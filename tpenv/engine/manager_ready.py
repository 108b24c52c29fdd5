"""`tpenv manager install|upgrade` returns when the webhook answers, not when manifests are applied.

    await wait_webhook(kube, probe_namespace, timeout=...) -> str    what was checked, for the output

Two steps, both driven by the cluster: the manager Deployment's rollout (watched until every
replica runs the applied template and is ready), then a server-side dry-run of an opted-in
pod in ``probe_namespace``: the API server calls the webhook exactly as for a real pod, and the
answer must carry the agent. Until kube-proxy routes the Service the call is ignored
(failurePolicy Ignore: the pod comes back without the agent), so it is asked again with
backoff, within the timeout. A dry run has no side effects (sideEffects: NoneOnDryRun).
"""
from __future__ import annotations

import asyncio
from typing import Any

from tpenv.engine.teammode import NAMESPACE
from tpenv.errors import Forbidden, RolloutStalled
from tpenv.kits.aio import Backoff
from tpenv.kits.kube import Kube, What
from tpenv.engine.injection import runs_agent
from tpenv_agent.inpod import LABEL_INJECT

NAME = "tpenv-manager"


def _rolled_out(d: dict[str, Any]) -> bool:
    spec, st = d.get("spec") or {}, d.get("status") or {}
    want = spec.get("replicas", 1)
    return (st.get("observedGeneration", 0) >= d["metadata"].get("generation", 0)
            and st.get("updatedReplicas", 0) == want and st.get("readyReplicas", 0) >= want
            and st.get("replicas", 0) == want)


async def _rollout(kube: Kube) -> None:
    async with kube.watch(kube.apps.list_namespaced_deployment, NAMESPACE, field_selector=f"metadata.name={NAME}",
                          what=What("watch", "deployments", NAMESPACE)) as events:
        async for kind, d in events:
            if kind != "DELETED" and _rolled_out(d):
                return


def probe_pod(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "tpenv-webhook-check-", "namespace": namespace,
                         "labels": {LABEL_INJECT: "enabled"}},
            "spec": {"containers": [{"name": "app", "image": "tpenv/webhook-check",
                                     "ports": [{"name": "http", "containerPort": 8080}]}]}}


async def _answers(kube: Kube, namespace: str) -> bool:
    pod = await kube.call(kube.core.create_namespaced_pod, namespace, probe_pod(namespace), dry_run="All",
                          what=What("create", "pods", namespace))
    return runs_agent(pod)


async def wait_webhook(kube: Kube, probe_namespace: str | None, *, timeout: float = 180.0) -> str:
    """None: no namespace is selected for injection, only the rollout is waited for."""
    try:
        async with asyncio.timeout(timeout):
            await _rollout(kube)
            if probe_namespace is None:
                return "the manager is ready"
            backoff = Backoff(0.2, 3.0)
            while True:
                try:
                    if await _answers(kube, probe_namespace):
                        return f"the webhook answers (checked with a dry-run pod in namespace {probe_namespace!r})"
                except Forbidden:
                    return (f"the manager is ready; not checked through the API server: no right to create pods "
                            f"in namespace {probe_namespace!r}")
                await asyncio.sleep(backoff.failed())  # kube-proxy has not routed the Service yet
    except TimeoutError as e:
        raise RolloutStalled(f"the tpenv manager did not answer admission requests within {timeout:.0f}s",
                             hint=f"see: kubectl -n {NAMESPACE} get pods,events; kubectl -n {NAMESPACE} logs "
                                  f"deploy/{NAME}") from e
