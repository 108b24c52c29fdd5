"""Replace mode's restore from inside the pod (docs/protocol.md §1.4).

A replaced pod's agent runs with ``--restore DIR``: DIR is the Secret ``tpenv-restore-<workload>``
(``restore.json``: the API path and the JSON Patch that brings the workload back; ``token``: a
ServiceAccount token bound to that Secret whose Role may only ``patch`` that one workload;
``ca.crt``). When the pod has held no intercept for ``grace`` seconds (``start_grace`` after the
agent starts, so the client has time to connect), the client is taken to be gone (kill -9, a lost
laptop) and the agent applies the patch itself: nobody has to type anything for the app to come
back. A clean leave applies the same patch from the client first; the agent's then fails its
``test`` (409/422) and changes nothing. After a restore the agent deletes the Secret, which
revokes the token (bound to it).
"""
from __future__ import annotations

import asyncio
import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import log as logs


class Restorer:
    def __init__(self, registry: Any, directory: str, *, grace: float = 20.0, start_grace: float = 120.0) -> None:
        self.registry = registry
        self.dir = Path(directory)
        self.grace, self.start_grace = grace, start_grace
        self.log = logs.unit("restore", directory)
        self._ended = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.done: str | None = None  # "restored", "already restored" once finished
        registry.on_end.append(lambda _icpt: self._ended.set())

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.run())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def wait_closed(self) -> None:
        if self._task is not None:
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - logged in run()
                pass

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline: float | None = loop.time() + self.start_grace
        while True:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await asyncio.wait_for(self._ended.wait(), timeout)
            except TimeoutError:
                if self.registry.all():
                    deadline = None  # held again: wait for its end
                    continue
                break
            self._ended.clear()
            if not self.registry.all():
                deadline = loop.time() + self.grace
        self.log.warning("no intercept for %.0fs: the client is gone; restoring the workload", self.grace)
        delay = 1.0
        while self.done is None:
            try:
                self.done = await asyncio.to_thread(self.apply)
            except (OSError, ValueError, urllib.error.URLError) as e:
                self.log.warning("restore failed: %s (again in %.0fs)", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.log.info("workload %s", self.done)

    def apply(self) -> str:
        """The patch, then the Secret's deletion; blocking (run in a thread)."""
        spec = json.loads((self.dir / "restore.json").read_text())
        try:
            self._call("PATCH", spec["workload"], spec["patch"], "application/json-patch+json")
        except urllib.error.HTTPError as e:
            if e.code not in (404, 409, 422):  # gone, or the test failed: the client restored it
                raise
            return "already restored"
        try:
            self._call("DELETE", spec["secret"], None, "application/json")
        except urllib.error.HTTPError as e:
            self.log.info("could not delete the restore Secret: HTTP %s", e.code)
        return "restored"

    def _call(self, method: str, path: str, body: Any, ctype: str) -> None:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        token = (self.dir / "token").read_text().strip()  # never logged
        req = urllib.request.Request(f"https://{host}:{port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": ctype,
                                              "Accept": "application/json"})
        ctx = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            resp.read()
