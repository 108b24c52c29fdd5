"""A newline-delimited-JSON request/answer channel over one asyncssh session channel.

Two clients speak this way to a tpenv SSH server: :class:`tpenv.kits.agent_client.AgentSession`
(the sidecar's ``tpenv-control`` subsystem, protocol §3) and
:class:`tpenv.kits.relay_client.RelaySession` (the manager relay's ``tpenv-resolve``, §7).
Each line is one JSON object; a request carries ``id`` and ``op``, and the answer carrying the
same ``id`` settles it, in whatever order answers come. The plumbing for that (request ids and
the table of pending futures, the reader task that routes answers, failing what is pending
when the channel goes, ``close()`` safe twice, ``wait_closed()``, ``_lost()``) lives here once,
so that both sessions lose a channel the same way. What the operations mean, how an answer's
error maps to :mod:`tpenv.errors`, and how each session connects stay in their own modules.

A subclass sets ``self._conn`` (the SSH connection) in its ``connect()``, calls
:meth:`JsonChannelSession._open_channel` to start the channel, and sends with
:meth:`JsonChannelSession._exchange`, which returns the raw answer dict.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import Any

import asyncssh

from tpenv.errors import TunnelDropped


class JsonChannelSession:
    """An SSH connection with one JSON-lines request/answer channel; ``async with``, ``close()`` safe twice.

    ``what`` names the session in errors ("the {what} is closed", "the {what} broke: ...");
    ``eof_why`` is what ``_lost`` logs when the server ends the channel.
    """

    def __init__(self, log: logging.Logger | logging.LoggerAdapter, *, what: str, eof_why: str) -> None:
        self.log = log
        self._what = what
        self._eof_why = eof_why
        self.closed = asyncio.Event()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._stdin: Any = None
        self._stdout: Any = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    # --- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Any:
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()

    async def connect(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """End the session: the SSH connection, its tasks, and every request still waiting. Safe twice."""
        if self._closing:
            return
        self._closing = True
        for t in self._tasks:
            t.cancel()
        if self._conn is not None:
            self._conn.close()
        self._fail_pending(TunnelDropped(f"the {self._what} was closed"))
        self.closed.set()

    async def wait_closed(self) -> None:
        await self.closed.wait()
        if self._conn is not None:
            await self._conn.wait_closed()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass

    def _lost(self, why: str) -> None:
        if not self.closed.is_set():
            self.log.warning("%s lost: %s", self._what, why)
        self.close()

    def _fail_pending(self, exc: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    # --- the channel -------------------------------------------------------------------
    async def _open_channel(self, subsystem: str, refused: str) -> None:
        """Open ``subsystem`` on ``self._conn`` and start routing its answers. TunnelDropped
        ("{refused}: why") when the server refuses it; the caller decides what to close then."""
        assert self._conn is not None
        try:
            self._stdin, self._stdout, _ = await self._conn.open_session(subsystem=subsystem, encoding=None)
        except (OSError, asyncssh.Error) as e:
            raise TunnelDropped(f"{refused}: {e}") from e
        self._tasks.append(asyncio.ensure_future(self._read_answers()))

    async def _read_answers(self) -> None:
        try:
            while True:
                line = await self._stdout.readline()
                if not line:
                    break
                try:
                    answer = json.loads(line)
                except ValueError:
                    continue
                fut = self._pending.pop(answer.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(answer)
        except (OSError, asyncssh.Error) as e:
            self._lost(type(e).__name__)
            return
        self._lost(self._eof_why)

    async def _exchange(self, op: str, fields: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request and return its answer as the server wrote it (``ok``/``error`` unread).

        TunnelDropped when the session is closed or the write breaks it. ``timeout`` bounds the
        wait for the answer: TimeoutError, and the session stays (a slow answer is not a broken
        channel; TimeoutError is an OSError since 3.11, hence its own clause first).
        """
        if self.closed.is_set() or self._stdin is None:
            raise TunnelDropped(f"the {self._what} is closed")
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._stdin.write(json.dumps({"id": rid, "op": op, **fields}).encode() + b"\n")
            return await (fut if timeout is None else asyncio.wait_for(fut, timeout))
        except asyncio.TimeoutError:
            raise
        except (OSError, asyncssh.Error) as e:
            self._pending.pop(rid, None)  # before _lost: its _fail_pending must not set an exception no one reads
            self._lost(type(e).__name__)
            raise TunnelDropped(f"the {self._what} broke: {e}") from e
        finally:
            self._pending.pop(rid, None)


__all__ = ["JsonChannelSession"]
