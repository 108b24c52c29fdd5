"""The webhook's one side effect, made safe: namespace ``tpenv-auth`` Secrets (docs/protocol.md §2).

An injected pod mounts Secret ``tpenv-auth`` of its namespace. A pod whose Secret is missing
sits in ContainerCreating until it appears, so the manager makes sure it exists BEFORE it
answers the admission with an agent, not after:

- **never cached**: every injection asks the API server (a create: 201, or 409 already there;
  one small call per injected pod). A ``tpenv-auth`` deleted by hand (or by ``uninstall
  --everything``) is re-created by the very next injection, so no new pod waits for it;
- **failures backed off**: a refusal (RBAC, quota, API down) puts the namespace in backoff,
  doubling from ``BACKOFF_MIN`` to ``BACKOFF_MAX``; during it, admissions get no agent at once,
  with the last error as the reason, and no API call. So a broken namespace costs one call per
  backoff step, not one per pod;
- **loud**: the reason goes into the pod's ``tpenv.io/not-injected`` annotation and the
  admission's warning; the manager's Refusals turn that into Warning Events on the pod and its
  workload, and ``tpenv doctor`` lists the pods with their reason.

The pod then starts without the agent (never stuck): its workload serves as if tpenv were not
there until the namespace is fixed and the pod recreated.
"""
from __future__ import annotations

import asyncio
import logging
import time
import urllib.error
from typing import Callable

log = logging.getLogger("tpenv_agent.manager")

BACKOFF_MIN = 2.0
BACKOFF_MAX = 300.0
CALL_TIMEOUT = 3.0  # inside the webhook's own timeoutSeconds (5)


class AuthSecrets:
    """namespace -> whether its tpenv-auth Secret is there, asked (and created) through ``create``:
    a blocking ``create(namespace) -> bool`` (True: created, False: already there), raising on a
    refusal."""

    def __init__(self, create: Callable[[str], bool], clock: Callable[[], float] = time.monotonic) -> None:
        self.create = create
        self.clock = clock
        self._failed: dict[str, tuple[int, float, str]] = {}  # namespace -> (failures, retry at, why)

    async def ensure(self, namespace: str) -> str | None:
        """None when the Secret is there (now), else why not (the admission then injects nothing)."""
        now = self.clock()
        failed = self._failed.get(namespace)
        if failed is not None and now < failed[1]:
            return f"{failed[2]} (retrying in {failed[1] - now:.0f}s)"
        try:
            created = await asyncio.wait_for(asyncio.to_thread(self.create, namespace), CALL_TIMEOUT)
        except (OSError, urllib.error.URLError, ValueError, asyncio.TimeoutError) as e:
            count = (failed[0] if failed else 0) + 1
            delay = min(BACKOFF_MIN * 2 ** (count - 1), BACKOFF_MAX)
            why = f"cannot create Secret tpenv-auth in {namespace}: {_describe(e)}"
            self._failed[namespace] = (count, self.clock() + delay, why)
            log.warning("[auth/%s] %s; no agent injected, next try in %.0fs", namespace, why, delay)
            return why
        if failed is not None:
            log.info("[auth/%s] Secret tpenv-auth works again after %d failure(s)", namespace, failed[0])
        self._failed.pop(namespace, None)
        if created:
            log.info("[auth/%s] Secret tpenv-auth created", namespace)
        return None

    def failing(self) -> dict[str, str]:
        """Namespaces whose Secret could not be made, and why (for the manager's log and tests)."""
        return {ns: why for ns, (_, _, why) in self._failed.items()}


def _describe(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, asyncio.TimeoutError):
        return f"the API server did not answer within {CALL_TIMEOUT:.0f}s"
    return f"{type(e).__name__}: {e}"


__all__ = ["AuthSecrets", "BACKOFF_MIN", "BACKOFF_MAX"]
