"""The manager's view of namespaces and its reports to users (docs/protocol.md §1.1).

- ``Policies``: each namespace's Pod Security ``enforce`` label, read through the API (``get
  namespaces``) and kept 30 s, so the webhook knows before injecting whether the in-pod
  redirect's init container would be admitted (else it hands named ports over instead).
- ``Refusals``: a pod that opted in but got no agent carries ``tpenv.io/not-injected: <reason>``
  (webhook.py). Its name does not exist yet when the webhook answers (generateName is resolved
  after admission), so the manager watches that namespace's pods until a minute after the last
  refusal there and puts a Warning Event ``AgentNotInjected`` on each such pod and on its
  workload (the Deployment behind a ReplicaSet): where ``kubectl describe`` shows it. Never
  only in the manager's log.

Both use the in-cluster service account through ``incluster.api_call`` (blocking, run in a thread).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import time
import urllib.error
from typing import Any, Callable

from .inpod import PSA_ENFORCE, redirect_allowed
from .webhook import ANN_NOT_INJECTED

log = logging.getLogger("tpenv_agent.manager")

POLICY_TTL = 30.0
WATCH_SECONDS = 60  # how long a namespace's pods are watched after a refusal
REPORTED_KEPT = 4096  # pod uids remembered as reported: the manager runs for months
REASON = "AgentNotInjected"
SOURCE = "tpenv-manager"


class Policies:
    """namespace -> (redirect allowed, why not), cached."""

    def __init__(self, api: Callable[..., dict] | None) -> None:
        self.api = api
        self._cache: dict[str, tuple[float, tuple[bool, str]]] = {}

    async def redirect(self, namespace: str) -> tuple[bool, str]:
        hit = self._cache.get(namespace)
        if hit and time.monotonic() - hit[0] < POLICY_TTL:
            return hit[1]
        labels: dict = {}
        if self.api is not None:
            try:
                ns = await asyncio.to_thread(self.api, "GET", f"/api/v1/namespaces/{namespace}", None, 3)
                labels = (ns.get("metadata") or {}).get("labels") or {}
            except (OSError, urllib.error.URLError, ValueError) as e:
                # Unknown: assume the redirect; an admission refusal would then show as the
                # ReplicaSet's FailedCreate, which names the Pod Security rule.
                log.warning("[webhook/policy] cannot read namespace %s (%s); assuming %s allows the redirect",
                            namespace, e, PSA_ENFORCE)
        choice = redirect_allowed(namespace, labels)
        self._cache[namespace] = (time.monotonic(), choice)
        return choice


class Refusals:
    """Events for pods the webhook could not inject, once each."""

    def __init__(self, api: Callable[..., dict] | None, window: float = WATCH_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api, self.window, self.clock = api, window, clock
        self.reported: dict[str, None] = {}  # pod uids, oldest first (bounded: first_report)
        self.watching: dict[str, asyncio.Task] = {}
        self.until: dict[str, float] = {}  # namespace -> when its watch may end (clock)

    def refused(self, namespace: str) -> None:
        """A pod of ``namespace`` was just refused: watch the namespace until ``window`` after now.

        Each refusal moves the end, also while a watch runs: a pod refused near the end of the
        window is created (named) after admission, possibly after a watch started by an earlier
        refusal has ended, and must still get its Event."""
        if self.api is None:
            return
        self.until[namespace] = self.clock() + self.window
        task = self.watching.get(namespace)
        if task is not None and not task.done():
            return  # its loop reads the new end when the current watch returns
        self.watching[namespace] = asyncio.get_running_loop().create_task(self._watch(namespace))

    async def _watch(self, namespace: str) -> None:
        # A watch with a server-side timeout, read in a thread: the events arrive as they happen.
        # Watched again while the end has moved: a new watch (no resourceVersion) starts with an
        # ADDED event for every pod there, so one created between two watches is not missed.
        while (left := self.until[namespace] - self.clock()) > 0:
            seconds = max(1, math.ceil(left))
            path = f"/api/v1/namespaces/{namespace}/pods?watch=1&timeoutSeconds={seconds}"
            try:
                await asyncio.to_thread(self._stream, path, namespace, seconds + 10)
            except (OSError, urllib.error.URLError, ValueError) as e:
                log.warning("[webhook/events] watching pods of %s failed: %s", namespace, e)
                return  # the next refusal starts again; no retry loop against a failing API

    def _stream(self, path: str, namespace: str, timeout: float) -> None:
        from .incluster import api_stream

        for line in api_stream(path, timeout=timeout):
            event = json.loads(line)
            pod = event.get("object") or {}
            meta = pod.get("metadata") or {}
            reason = (meta.get("annotations") or {}).get(ANN_NOT_INJECTED)
            if event.get("type") in ("ADDED", "MODIFIED") and reason and self.first_report(meta.get("uid")):
                self._report(namespace, pod, reason)

    def first_report(self, uid: str | None) -> bool:
        """True the first time ``uid`` is seen; remembers the last ``REPORTED_KEPT`` only. A pod
        forgotten that way gets a second Event only if it is modified after that many newer
        refusals: a duplicate Event, against a set that grew for as long as the manager ran."""
        if not uid or uid in self.reported:
            return False
        self.reported[uid] = None
        if len(self.reported) > REPORTED_KEPT:
            del self.reported[next(iter(self.reported))]
        return True

    def _report(self, namespace: str, pod: dict, reason: str) -> None:
        meta = pod["metadata"]
        targets = [{"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]}]
        owner = self._workload(namespace, meta)
        if owner:
            targets.append(owner)
        for ref in targets:
            try:
                self.api("POST", f"/api/v1/namespaces/{namespace}/events", event(namespace, ref, reason))
            except (OSError, urllib.error.URLError, ValueError) as e:
                log.warning("[webhook/events] cannot record an Event on %s/%s: %s", ref["kind"], ref["name"], e)
        log.info("[webhook/events] %s/%s: opted in, not injected: %s", namespace, meta["name"], reason)

    def _workload(self, namespace: str, meta: dict) -> dict | None:
        """The pod's workload: its controller, or the Deployment owning that ReplicaSet."""
        ctrl = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
        if ctrl is None:
            return None
        ref = {"kind": ctrl["kind"], "apiVersion": ctrl["apiVersion"], "name": ctrl["name"], "uid": ctrl["uid"]}
        if ctrl["kind"] != "ReplicaSet":
            return ref
        try:
            rs = self.api("GET", f"/apis/apps/v1/namespaces/{namespace}/replicasets/{ctrl['name']}")
        except (OSError, urllib.error.URLError, ValueError):
            return ref
        up = next((o for o in rs["metadata"].get("ownerReferences") or [] if o.get("controller")), None)
        if up is None:
            return ref
        return {"kind": up["kind"], "apiVersion": up["apiVersion"], "name": up["name"], "uid": up["uid"]}


def event(namespace: str, ref: dict, reason: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{ref['name']}.tpenv-", "namespace": namespace},
        "involvedObject": {**ref, "namespace": namespace},
        "reason": REASON, "type": "Warning",
        "message": f"opted in to tpenv's agent, not injected: {reason}"[:1024],
        "source": {"component": SOURCE},
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }
