"""What an intercept needs only once its agent's pods run, imported while the rollout waits.

    begin()          start importing :data:`LATE` in a worker thread (once per process)
    await ready()    until that import is done (starting it if nobody did)

Why (issue 13, the `up` row): asyncssh with cryptography, dnspython, websockets and the
port-forward transports are about a third of `tpenv up`'s imports (0.2-0.3 s on the bench
machine), and none of them is used before the injecting rollout has made a pod Ready: the
SSH tunnel, the env's exec, sshfs, the route probe and forwards come after. So the modules
on the way to the workload's write import them inside the functions that use them, the
write calls :func:`begin`, and the intercept awaits :func:`ready` before its first tunnel,
so no two threads import the same modules at once.
"""
from __future__ import annotations

import asyncio
import importlib

LATE = (
    "tpenv.kits.agent_client",  # asyncssh, cryptography
    "tpenv.kits.portforward",  # SPDY and WebSocket transports, websockets
    "tpenv.engine.appenv",  # exec in the app container
    "tpenv.engine.mounts",  # sshfs
    "tpenv.engine.routeready",
    "tpenv.engine.forwards",
)

_started: dict[asyncio.AbstractEventLoop, asyncio.Future] = {}  # per loop: tests run several


def _import_all() -> None:
    for name in LATE:
        importlib.import_module(name)


def begin() -> asyncio.Future:
    """Start the import in the loop's default executor; the same future on every later call (a
    failed one is retried: the error then comes from the import in the code that needs it)."""
    loop = asyncio.get_running_loop()
    future = _started.get(loop)
    if future is None or (future.done() and (future.cancelled() or future.exception() is not None)):
        for old in [k for k in _started if k.is_closed()]:
            del _started[old]
        future = _started[loop] = loop.run_in_executor(None, _import_all)
    return future


async def ready() -> None:
    try:
        await asyncio.shield(begin())
    except Exception:  # noqa: BLE001 - the same import raises again, where it is used, with its context
        pass
