"""Sessions of `tpenv intercept`: an id, a published state file, and finding the one holding a name.

A session is one running `tpenv intercept` (or `tpenv up`) process. Its id (``new_session_id``)
is the SSH principal and the first half of every intercept id (``<session>:<name>``). It is
published with the same mechanism as `tpenv up` (tpenv.engine.statusd: a state file and a Unix
socket under ``settings.session.state_dir``), so `tpenv status`, `tpenv leave NAME` and
`tpenv list` reach it from another shell; a killed session's files are ignored and removed.
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from tpenv.engine.statusd import SessionInfo, StatusServer, find_sessions, new_session_id, request_down, \
    request_env, request_status
from tpenv.errors import NotFound, TpenvError, UsageError
from tpenv.settings import Settings

__all__ = ["new_session_id", "publish_session", "running_intercepts", "find_intercept", "intercept_env", "leave"]


def _state_dir(settings: Settings):
    return settings.session.state_dir


@contextlib.asynccontextmanager
async def publish_session(settings: Settings, session_id: str, snapshot: Callable[[], dict[str, Any]],
                          on_down: Callable[[], None],
                          env_of: Callable[[str], dict[str, str] | None] | None = None
                          ) -> AsyncIterator[StatusServer]:
    """Publish this session while the block runs; `down`/`leave` from elsewhere call ``on_down``,
    `tpenv env NAME` calls ``env_of(NAME)``."""
    async with StatusServer(snapshot=snapshot, on_down=on_down, state_dir=_state_dir(settings),
                            session_id=session_id, env_of=env_of) as server:
        yield server


async def running_intercepts(settings: Settings) -> list[tuple[SessionInfo, dict[str, Any]]]:
    """Every intercept of every running session on this machine, with its session."""
    out = []
    for s in find_sessions(_state_dir(settings)):
        try:
            status = await request_status(s, timeout=3)
        except TpenvError:
            continue  # it went away while we asked
        for ic in status.get("intercepts") or []:
            out.append((s, ic))
    return out


async def find_intercept(settings: Settings, name: str) -> tuple[SessionInfo, dict[str, Any]]:
    found = [(s, ic) for s, ic in await running_intercepts(settings) if ic.get("name") == name]
    if not found:
        raise NotFound(f"no running intercept named {name!r} on this machine",
                       hint="`tpenv list` shows the intercepts; an intercept of a killed session ends by "
                            "itself within the agent's lease")
    return found[0]


async def intercept_env(settings: Settings, name: str) -> dict[str, str] | None:
    """The env a running intercept ``name`` on this machine gives its handler (``tpenv intercept`` or
    ``tpenv up``); None when no running session holds an intercept of that name."""
    for session, ic in await running_intercepts(settings):
        if ic.get("name") == name:
            env = await request_env(session, name)
            if env is not None:
                return env
    return None


async def leave(settings: Settings, name: str, *, wait: float = 30.0) -> dict[str, Any]:
    """End intercept ``name``: its session leaves (agents back to passthrough), unmounts and exits."""
    session, ic = await find_intercept(settings, name)
    if ic.get("held_by") == "up":
        # The session keeps telepresence.yaml true: ending one intercept behind its back would
        # only see it recreated. Say what does end it.
        raise UsageError(f"intercept {name!r} belongs to the `tpenv up` session {session.id} (pid {session.pid}), "
                         "which keeps it as its telepresence.yaml declares",
                         hint=f"remove it from {session.config or 'telepresence.yaml'} (up applies the edit), "
                              "or stop that session with `tpenv down`")
    if not await request_down(session, wait=wait):
        raise TpenvError(f"the session holding {name!r} (pid {session.pid}) did not stop within {wait:.0f}s",
                         hint=f"kill it (kill {session.pid}); the agents end its intercepts within their lease")
    return ic
