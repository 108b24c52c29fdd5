"""How `tpenv status` and `tpenv down` reach a running `tpenv up` from another shell.

A running session writes ``<state_dir>/<id>.json`` (pid, socket, config file, started) and
serves ``<state_dir>/<id>.sock``: one JSON object per line in each direction.

    {"request": "status"}  ->  {"ok": true, "session": {...}, "units": [...], "config_error": ...}
    {"request": "down"}    ->  {"ok": true, "stopping": true}, then the connection stays open
                               until the session has stopped (EOF), so `down` can wait for it.

Files of sessions whose pid is dead (kill -9, crash) are ignored and removed by ``find_sessions``.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tpenv.errors import NotFound, TransientError, UsageError
from tpenv.kits.aio import unit_logger

DEFAULT_STATE_DIR = Path("~/.cache/tpenv/sessions")
MAX_LINE = 1 << 20
SUN_PATH_MAX = 107  # Linux sockaddr_un.sun_path, minus the terminating NUL


@dataclass(frozen=True)
class SessionInfo:
    id: str
    pid: int
    socket: str
    config: str | None
    started: float  # unix time

    @property
    def state_file(self) -> Path:
        return Path(self.socket).with_suffix(".json")


def new_session_id() -> str:
    return secrets.token_hex(4)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def find_sessions(state_dir: str | Path = DEFAULT_STATE_DIR) -> list[SessionInfo]:
    """Running sessions, oldest first; files of dead pids are removed, unreadable ones ignored."""
    state_dir = Path(state_dir).expanduser()
    found = []
    for path in sorted(state_dir.glob("*.json")):
        try:
            info = SessionInfo(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # half-written or foreign: not ours to judge
        if not _pid_alive(info.pid):
            for stale in (path, Path(info.socket)):
                try:
                    stale.unlink()
                except OSError:
                    pass
            continue
        found.append(info)
    return sorted(found, key=lambda s: s.started)


class StatusServer:
    """Serves status/down for one session; ``async with`` publishes it, exit removes it."""

    def __init__(
        self,
        *,
        snapshot: Callable[[], dict[str, Any]],
        on_down: Callable[[], None],
        state_dir: str | Path = DEFAULT_STATE_DIR,
        session_id: str | None = None,
        config: str | Path | None = None,
        env_of: Callable[[str], dict[str, str] | None] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).expanduser()
        self.id = session_id or new_session_id()
        self.snapshot, self.on_down = snapshot, on_down
        # The env a named intercept's handler gets (None: no such intercept, or not ready yet).
        # Asked for by `tpenv env NAME`; it holds secrets, so it is never in status or the state file.
        self.env_of = env_of
        sock = self.state_dir / f"{self.id}.sock"
        if len(os.fsencode(sock)) > SUN_PATH_MAX:
            raise UsageError(f"session socket path too long for Unix sockets: {sock}",
                             hint="set TPENV_SESSION_STATE_DIR to a shorter directory")
        self.info = SessionInfo(self.id, os.getpid(), str(sock),
                                str(Path(config).resolve()) if config else None, time.time())
        self.log = unit_logger("statusd", self.id)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._closed = False

    async def start(self) -> None:
        try:
            await self._publish()
        except OSError as e:
            await self.stop()
            raise UsageError(f"cannot publish the session in {self.state_dir}: {e.strerror or e}",
                             hint="set TPENV_SESSION_STATE_DIR to a writable directory") from e

    async def _publish(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        sock = Path(self.info.socket)
        sock.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(sock), limit=MAX_LINE)
        os.chmod(sock, 0o600)  # status shows last errors; down stops the session: owner only
        tmp = self.info.state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self.info)))
        os.chmod(tmp, 0o600)
        tmp.replace(self.info.state_file)  # readers never see half a file
        self.log.debug("serving status on %s", sock)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                try:
                    message = json.loads(line)
                    request = message.get("request")
                except (ValueError, AttributeError):
                    message, request = {}, None
                if request == "status":
                    reply = {"ok": True, "session": asdict(self.info), **self.snapshot()}
                elif request == "down":
                    self.log.info("down requested from another shell")
                    reply = {"ok": True, "stopping": True}
                    self.on_down()
                elif request == "env":
                    env = self.env_of(str(message.get("name"))) if self.env_of is not None else None
                    reply = {"ok": True, "env": env}
                else:
                    reply = {"ok": False, "error": f"unknown request {request!r}; expected status, down or env"}
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass  # a client that went away or sent garbage: nothing to answer
        finally:
            self._writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        """Unpublish, then end every connection (a waiting `down` sees EOF). Safe twice."""
        if self._closed:
            return
        self._closed = True
        for path in (self.info.state_file, Path(self.info.socket)):
            try:
                path.unlink()
            except OSError:
                pass
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            await self._server.wait_closed()

    close = stop

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> StatusServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# --- the client side (tpenv status / tpenv down) ------------------------------------------


async def _open(session: SessionInfo | str | Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = session.socket if isinstance(session, SessionInfo) else str(session)
    try:
        return await asyncio.open_unix_connection(sock, limit=MAX_LINE)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise NotFound("that tpenv up session is not running any more", hint="`tpenv status` lists sessions") from e
    except OSError as e:
        raise TransientError(f"cannot reach the tpenv up session at {sock}: {e}") from e


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: str, timeout: float,
               **fields: Any) -> dict:
    writer.write(json.dumps({"request": request, **fields}).encode() + b"\n")
    try:
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError as e:
        raise TransientError(f"the tpenv up session did not answer {request!r} within {timeout:.0f}s") from e
    except ConnectionError as e:
        raise NotFound("the tpenv up session went away") from e
    if not line:
        raise NotFound("the tpenv up session went away")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise TransientError(f"the tpenv up session refused {request!r}: {reply.get('error')}")
    return reply


async def request_status(session: SessionInfo | str | Path, timeout: float = 5.0) -> dict[str, Any]:
    """The session's status: ``{"session": {...}, "units": [...], "config_error": ..., "stopping": ...}``."""
    reader, writer = await _open(session)
    try:
        return await _ask(reader, writer, "status", timeout)
    finally:
        writer.close()


async def request_env(session: SessionInfo | str | Path, name: str, timeout: float = 5.0) -> dict[str, str] | None:
    """The env intercept ``name`` of the session gives its handler; None when it has no such ready intercept."""
    reader, writer = await _open(session)
    try:
        return (await _ask(reader, writer, "env", timeout, name=name)).get("env")
    finally:
        writer.close()


async def request_down(session: SessionInfo | str | Path, timeout: float = 5.0,
                       wait: float | None = 60.0) -> bool:
    """Ask the session to stop; with ``wait``, wait up to that long until it has stopped.
    Returns True when it is known to have stopped (or ``wait`` is None and it accepted)."""
    reader, writer = await _open(session)
    try:
        await _ask(reader, writer, "down", timeout)
        if wait is None:
            return True
        try:
            await asyncio.wait_for(reader.read(), wait)  # EOF: the session closed its server
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True
    finally:
        writer.close()
