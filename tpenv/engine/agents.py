"""Agents: make sure a workload's pods carry the tpenv agent for a port, and take it out again.

Patch mode (docs/protocol.md §1): :func:`ensure_agent` plans the injection with
``tpenv.engine.injection`` (pure), creates Secret ``tpenv-auth`` when missing, replaces the
workload (with its resourceVersion: a concurrent edit fails instead of being lost, and the
refused write, a 409, reads the workload and Service again and redoes the plan), waits for
the rollout while printing a progress line (adding each new pod's ephemeral redirect container
as soon as the pod exists, ephemeral.py, where the redirect goes that way). With the in-pod
redirect (the default) nothing else changes; where the namespace's Pod Security forbids it (``redirect.py`` of this package decides),
the hand-over then rewrites the Service's numeric ``targetPort`` (only after the rollout, so no
caller ever hits a pod that does not have the agent's named port yet), and says once which
paths the intercept cannot take.

A stalled rollout fails fast with its cause, read from the pods: an image that cannot be
pulled, a pod the scheduler cannot place, a container that crashes, a readiness probe failing.

Taking the agent out again (:func:`~tpenv.engine.agent_removal.remove_agent`, the history
pruning) is agent_removal.py.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tpenv.engine import lateimports
from tpenv.engine.agent_removal import UPDATE_ATTEMPTS, remove_agent
from tpenv.engine.ephemeral import add_redirect, redirect_added, redirect_failure
from tpenv.engine.endpoints import wait_endpoints  # noqa: F401 - replace.py and callers import it from here
from tpenv.engine.injection import InjectionPlan, plan_injection
from tpenv.engine.redirect import redirect_choice, redirect_via
from tpenv.errors import NotFound, PermanentError, RolloutStalled, TransientError, UpdateConflict, UsageError
from tpenv.kits.aio import unit_logger
from tpenv.kits.kube import Kube, What, Workload, pod_is_ready, tracked
from tpenv_agent.inject import AGENT_CONTAINER, ANN_RESTORE, AUTH_SECRET, MODE_REDIRECT
from tpenv_agent.agentspec import listens
from tpenv_agent.inpod import bypass_note, opted_in
from tpenv.settings import Settings

Progress = Callable[[str], None]
# Waiting reasons that never heal by themselves: fail at once, naming them.
_PULL_FAILURES = {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"}
_UNSCHEDULABLE_GRACE = 15.0  # the scheduler may still place it when another pod goes away
_STARTING = {"ContainerCreating", "PodInitializing", None}  # a container's waiting reasons on its way up


@dataclass
class AgentReady:
    workload: Workload
    service: dict[str, Any]
    record: dict[str, Any]  # the restore record: container, ports
    port_name: str  # the agent port name to give the control channel's `intercept`
    container: str  # the app container
    rolled_out: bool  # False when the agent was already there


def pod_serves(pod: dict[str, Any], port_name: str) -> bool:
    """Whether the pod's agent container listens for ``port_name`` (``--listen A:P:NAME``)."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == AGENT_CONTAINER:
            return any(isinstance(a, str) and a.endswith(":" + port_name) for a in c.get("args") or [])
    return False


def pod_started(pod: dict[str, Any]) -> bool:
    """Whether the pod is on a node, neither ended nor being deleted, and its agent container is
    not stuck (an image pull failing, a crash loop): Ready or not yet. Its containers start
    there up to a second before the kubelet's next relist tells the API server (the pod's IP
    and the container states come with it); a port-forward reaches the agent as soon as it
    listens, which is what a starting tunnel waits for (tunnels.py)."""
    status = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp") or not (pod.get("spec") or {}).get("nodeName") \
            or status.get("phase") not in ("Pending", "Running"):
        return False
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == AGENT_CONTAINER:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            return not waiting or waiting.get("reason") in _STARTING
    return True


def pod_listen_name(pod: dict[str, Any], sp: dict[str, Any]) -> str | None:
    """The name the pod's agent gives Service port ``sp``'s target (``--listen A:P:NAME``), or None.

    A webhook-injected agent names a port after the container port (``http``, or ``tpenv-8080``
    when unnamed) while the Service may target it by number: match the number too."""
    target = sp.get("targetPort", sp["port"])
    numeric = isinstance(target, int) or str(target).isdigit()
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") != AGENT_CONTAINER:
            continue
        for _agent, app, name in listens(c):
            if (numeric and app == str(target)) or name == str(target):
                return name
    return None


def service_port(service: dict[str, Any], remote: str | int | None) -> dict[str, Any]:
    """The Service port a user means by ``remote`` (name or number; None when there is one)."""
    ports = (service.get("spec") or {}).get("ports") or []
    name = service["metadata"]["name"]
    listed = ", ".join(f"{p.get('name') or '-'}={p['port']}" for p in ports) or "none"
    if remote is None:
        if len(ports) == 1:
            return ports[0]
        raise UsageError(f"Service {name!r} has several ports ({listed}); say which with --port LOCAL:REMOTE",
                         hint=f"e.g. --port 8080:{ports[0].get('name') or ports[0]['port']}")
    found = [p for p in ports if (p.get("name") == remote if isinstance(remote, str) else p["port"] == remote)]
    if not found:
        raise NotFound(f"Service {name!r} exposes no port {remote!r} (its ports: {listed})",
                       hint="give one of its port names or numbers after the colon in --port")
    return found[0]


def agent_port_name(sp: dict[str, Any]) -> str:
    """The agent's port name for a Service port (protocol §1): the named targetPort, or tpenv-<n>."""
    target = sp.get("targetPort", sp["port"])
    if isinstance(target, str) and not target.isdigit():
        return target
    return f"tpenv-{int(target)}"


async def pick_service(kube: Kube, w: Workload, name: str | None) -> dict[str, Any]:
    services = await kube.services_for(w)
    if name:
        chosen = [s for s in services if s["metadata"]["name"] == name]
        if not chosen:
            names = ", ".join(s["metadata"]["name"] for s in services) or "none"
            raise NotFound(f"Service {name!r} does not select {w.ref} in {w.namespace!r} (Services that do: {names})")
        return chosen[0]
    if not services:
        raise NotFound(f"no Service in namespace {w.namespace!r} selects {w.ref}",
                       hint="intercepts take over a Service port: expose the workload (kubectl expose) first")
    if len(services) > 1:
        names = ", ".join(s["metadata"]["name"] for s in services)
        raise UsageError(f"several Services select {w.ref} ({names}); pick one with --service NAME")
    return services[0]


async def ensure_agent(kube: Kube, w: Workload, service: dict[str, Any], sp: dict[str, Any], settings: Settings, *,
                       progress: Progress | None = None, container: str | None = None,
                       written: Callable[[AgentReady], None] | None = None) -> AgentReady:
    """Inject the agent for Service port ``sp`` unless it is there; wait until the pods run it.

    ``written`` is called once the workload's write is accepted, before the rollout wait, with
    what the tunnels already need (port name, container; ``rolled_out`` True): an intercept
    connects to each new pod's agent while the rest of the rollout goes on (intercepts.py)."""
    log = unit_logger("agent", f"{w.namespace}/{w.name}")
    say = progress or (lambda text: log.info("%s", text))
    port_name = agent_port_name(sp)
    if webhook_mode(w):
        return await _webhook_agent(kube, w, service, sp, port_name, say)
    port_key = sp.get("name") or sp["port"]
    # Independent reads: at the same time (each is a round trip before the rollout can start).
    secret_exists, (redirect, why), via = await asyncio.gather(
        _secret_exists(kube, w.namespace), redirect_choice(kube, w, settings, container),
        redirect_via(kube, w, settings))
    svc_name = service["metadata"]["name"]

    def planned(w: Workload, service: dict[str, Any]) -> InjectionPlan:
        return plan_injection(w.obj, service, port_key, settings, container=container,
                              auth_secret_exists=secret_exists, redirect=(redirect, why), via=via)

    plan = planned(w, service)
    if plan.record.get("mode") != MODE_REDIRECT:
        # Said once per intercept, where the user looks (the progress lines), never only in a log.
        say(f"Note: {bypass_note(plan.record.get('why') or why or 'the agent was injected without it')}")
    rolled_out = False

    def ours(w: Workload, service: dict[str, Any]) -> None:
        nonlocal rolled_out
        rolled_out = True
        lateimports.begin()  # what the tunnels need loads while the pods start
        if written is not None:
            written(AgentReady(w, service, plan.record, port_name, plan.record["container"], True))

    writing = False
    for attempt in range(UPDATE_ATTEMPTS):
        try:
            # Dry runs first: a refusal (RBAC, admission, validation) must come before any change.
            # The workload's only when something else is written before it (the Secret, the
            # Service): alone, its own write is all or nothing.
            if plan.workload_changed and (plan.service is not None or not secret_exists):
                await kube.replace_workload(w, plan.workload, dry_run=True)
            if plan.service is not None:
                await kube.call(kube.core.replace_namespaced_service, svc_name, w.namespace, plan.service,
                                dry_run="All", what=What("update", "services", w.namespace, svc_name))
            if plan.workload_changed:
                if not secret_exists:
                    from tpenv.engine.tunnels import ensure_auth_material

                    await ensure_auth_material(kube, w.namespace, seen_missing=True)
                    secret_exists = True  # a retry below (a 409 on the workload) must not make it again
                if attempt == 0:
                    say(f"Injecting the tpenv agent into {w.ref} (port {port_key})")
                writing = True
                w = await kube.replace_workload(w, plan.workload)
                writing = False
                ours(w, service)
            break
        except TransientError as e:
            # A 409 (UpdateConflict): another writer (a controller's status, a rollout, a second
            # intercept) changed the workload or the Service since we read them. A 5xx or a
            # dropped connection: the API server was busy (a 504 under load). The plan is a pure
            # function of both objects, so read them again and redo it, after the error's delay.
            if attempt == UPDATE_ATTEMPTS - 1:
                raise
            # Only a write whose answer was lost may have landed (a 409 says it did not).
            maybe_landed, writing = writing and not isinstance(e, UpdateConflict), False
            if not isinstance(e, UpdateConflict):
                say(f"The API server did not answer ({e.message}); trying again")
                await asyncio.sleep(e.retry_after)
            w, service = await kube.reload(w), await _read_service(kube, w.namespace, svc_name)
            plan = planned(w, service)
            if maybe_landed and not plan.workload_changed:  # it had: the rollout is ours
                ours(w, service)
    timeout = settings.kube.rollout_timeout
    try:
        w = await wait_rollout(kube, w, port_name, timeout=timeout, progress=say)
    except (RolloutStalled, PermanentError) as e:  # permanent: the redirect refused (ephemeral.py)
        if not rolled_out:
            raise
        # We broke it: put the workload back as it was, so the app keeps serving as before.
        await remove_agent(kube, await kube.reload(w), progress=say)
        raise type(e)(f"{e.message}; {w.ref} was restored as it was", hint=e.hint) from e
    for attempt in range(UPDATE_ATTEMPTS):
        if plan.service is None:
            break
        try:
            service = await kube.call(kube.core.replace_namespaced_service, svc_name, w.namespace, plan.service,
                                      what=What("update", "services", w.namespace, svc_name))
            break
        except TransientError as e:  # a 409, or a 5xx (replacing a Service twice is harmless)
            if attempt == UPDATE_ATTEMPTS - 1:
                raise
            if not isinstance(e, UpdateConflict):
                await asyncio.sleep(e.retry_after)
            # The rolled-out workload (wait_rollout read it) with the Service as it is now.
            service = await _read_service(kube, w.namespace, svc_name)
            plan = planned(w, service)
    entry = next(e for e in plan.record["ports"] if e["name"] == port_name)
    # With the redirect the endpoints keep the app's port (the pod sends it to the agent).
    endpoint_port = entry["app_port"] if plan.record.get("mode") == MODE_REDIRECT else entry["agent_port"]
    # "Ready" only once every Service on this port routes to the agents' pods (endpoints.py).
    await wait_endpoints(kube, w, service, sp, endpoint_port, port_name, progress=say,
                         timeout=settings.kube.endpoints_timeout, app_port=int(entry["app_port"]))
    return AgentReady(w, service, plan.record, port_name, plan.record["container"], rolled_out)


async def _read_service(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return await kube.call(kube.core.read_namespaced_service, name, namespace,
                           what=What("get", "services", namespace, name))


async def _secret_exists(kube: Kube, namespace: str) -> bool:
    return await kube.found(kube.core.read_namespaced_secret, AUTH_SECRET, namespace,
                            what=What("get", "secrets", namespace, AUTH_SECRET))


def _stall_cause(pod: dict[str, Any], now: float, since: float) -> str | None:
    """Why this pod will not become ready by itself, or None while it may still."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    for cs in [*(status.get("containerStatuses") or []), *(status.get("initContainerStatuses") or []),
               *(status.get("ephemeralContainerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in _PULL_FAILURES:
            return (f"image pull failed for container {cs['name']!r} of pod {name} ({reason}: "
                    f"{waiting.get('message') or cs.get('image')}); is the image {cs.get('image')!r} available "
                    f"to the cluster? (setting agent.image / agent.image_pull_policy)")
        if reason == "CrashLoopBackOff":
            term = (cs.get("lastState") or {}).get("terminated") or {}
            return (f"container {cs['name']!r} of pod {name} keeps crashing (exit {term.get('exitCode', '?')}, "
                    f"{term.get('reason', '')}); see: kubectl logs {name} -c {cs['name']} --previous")
        if reason in ("CreateContainerConfigError", "CreateContainerError"):
            return f"container {cs['name']!r} of pod {name} cannot be created ({reason}: {waiting.get('message', '')})"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                and cond.get("reason") == "Unschedulable" and now - since > _UNSCHEDULABLE_GRACE:
            return f"pod {name} cannot be scheduled: {cond.get('message', '')}"
    return None


def _readiness_cause(pods: list[dict[str, Any]]) -> str:
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if not cs.get("ready") and "running" in (cs.get("state") or {}):
                return (f"container {cs['name']!r} of pod {pod['metadata']['name']} runs but is not ready "
                        f"(readiness probe failing); see: kubectl describe pod {pod['metadata']['name']}")
    return "no pod became ready"


async def wait_rollout(kube: Kube, w: Workload, port_name: str, *, timeout: float,
                       progress: Progress, serves: Callable[[dict[str, Any]], bool] | None = None,
                       what: str = "with the agent") -> Workload:
    """Until every replica is a ready pod whose agent serves ``port_name`` (or for which ``serves``
    holds: replace mode waits for its placeholder, and for its absence on leave) and no pod without
    it is left (terminating ones aside); driven by the pod watch, with the stall cause on failure."""
    started = time.monotonic()
    if serves is None:
        serves = lambda p: pod_serves(p, port_name)  # noqa: E731
    pods: dict[str, dict[str, Any]] = {}
    added: set[str] = set()  # pods whose redirect container we added (a late event may not show it yet)
    last_line = ""

    def replicas() -> int:
        spec = w.obj.get("spec") or {}
        return int(spec.get("replicas", 1) if spec.get("replicas") is not None else 1)

    def done() -> bool:
        live = [p for p in pods.values() if not p["metadata"].get("deletionTimestamp")]
        good = [p for p in live if serves(p) and pod_is_ready(p) and redirect_added(p)]
        stale = [p for p in live if not serves(p)]
        return len(good) >= replicas() and not stale

    def line() -> str:
        live = [p for p in pods.values() if not p["metadata"].get("deletionTimestamp")]
        good = sum(1 for p in live if serves(p) and pod_is_ready(p))
        return f"Waiting for {w.ref}: {good}/{replicas()} pods ready {what}"

    try:
        async with asyncio.timeout(timeout):
            async with kube.watch(kube.core.list_namespaced_pod, w.namespace, label_selector=w.selector,
                                  what=What("watch", "pods", w.namespace)) as events:
                async for kind, pod in tracked(events, pods):
                    if kind != "DELETED" and serves(pod):
                        # The redirect as an ephemeral container goes in as soon as the pod
                        # exists: the kubelet then starts it with the app (ephemeral.py).
                        if pod["metadata"]["uid"] not in added and await add_redirect(kube, pod):
                            added.add(pod["metadata"]["uid"])
                        cause = (redirect_failure(pod) or (None if pod_is_ready(pod) else
                                                           _stall_cause(pod, time.monotonic(), started)))
                        if cause:
                            raise RolloutStalled(f"the rollout of {w.ref} stalled: {cause}", retry_after=10)
                    if done():
                        return await kube.reload(w)
                    text = line()
                    if text != last_line:
                        last_line = text
                        progress(text)
    except TimeoutError as e:
        serving = [p for p in pods.values() if serves(p)]
        raise RolloutStalled(f"the rollout of {w.ref} did not finish within {timeout:.0f}s: "
                             f"{_readiness_cause(serving)}") from e
    raise RolloutStalled(f"the pod watch of {w.ref} ended before the rollout finished")


def webhook_mode(w: Workload) -> bool:
    """The pod template opts in to the manager's webhook (GitOps; tpenv's label or Telepresence's
    annotation): tpenv must not patch it."""
    tpl = ((w.obj.get("spec") or {}).get("template")) or {}
    return opted_in(tpl) is not None


def pod_agent_container_arg(pod: dict[str, Any]) -> str | None:
    """The app container the pod's agent serves (its ``--container`` argument)."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == AGENT_CONTAINER:
            args = [a for a in c.get("args") or [] if isinstance(a, str)]
            if "--container" in args[:-1]:
                return args[args.index("--container") + 1]
    return None


async def _webhook_agent(kube: Kube, w: Workload, service: dict[str, Any], sp: dict[str, Any], port_name: str,
                         say: Progress) -> AgentReady:
    """Webhook mode: the manager injected the agent at pod creation; check it serves the port.

    The Service may target the port by name or number (the agent names it after the container
    port), and is never changed."""
    ready = await kube.ready_pods(w)
    named = [(p, pod_listen_name(p, sp)) for p in ready]
    pods = [p for p, n in named if n]
    if not pods:
        refusals = {((p["metadata"].get("annotations") or {}).get("tpenv.io/not-injected")) for p in ready} - {None}
        if refusals:
            raise PermanentError(f"{w.ref} opted in, not injected: {sorted(refusals)[0]}",
                                 hint="fix the pod template as the reason says; the manager injects new pods")
        raise RolloutStalled(f"no ready pod of {w.ref} runs the webhook-injected agent for port {port_name!r}",
                             hint=f"is the manager installed, with namespace {w.namespace} selected (tpenv manager "
                                  f"upgrade --webhook-namespace {w.namespace})? pods created before that need "
                                  f"a restart: kubectl rollout restart {w.ref} -n {w.namespace}")
    port_name = next(n for p, n in named if n)
    say(f"Using the agent the webhook injected into {w.ref}")
    record = _pod_record(pods[0])
    if record.get("mode") != MODE_REDIRECT:
        say(f"Note: {bypass_note(record.get('why') or 'the webhook injected the agent without it')}")
    container = pod_agent_container_arg(pods[0]) or w.containers[0]["name"]
    return AgentReady(w, service, {"container": container, "ports": []}, port_name, container, False)


def _pod_record(pod: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads((pod["metadata"].get("annotations") or {}).get(ANN_RESTORE) or "{}")
    except ValueError:
        return {}
