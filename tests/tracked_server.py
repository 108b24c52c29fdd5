"""A local asyncio server for tests that closes every connection it accepted when it exits.

Test doubles that stand in for the API server (the unit tests' fake kubelet in
``tests/unit/test_spdy_session.py``, the e2e tests' WebSocket-refusing proxy in
``tests/e2e/test_portforward_spdy.py``) listen on 127.0.0.1:0, serve each connection in its
own task, and at exit must end those tasks rather than leave them to the next test. That
bookkeeping is here once; a subclass writes ``handle(reader, writer)`` and reads ``port``.
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Any


class TrackedServer:
    """``async with`` a server on 127.0.0.1 (``port`` read back after entering); TLS with ``ssl_context``."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.tasks: set[asyncio.Task] = set()
        self.writers: set[asyncio.StreamWriter] = set()  # closed at exit; handle() may add more (upstreams)

    async def __aenter__(self) -> Any:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()
        for w in list(self.writers):
            w.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        self.writers.add(writer)
        try:
            await self.handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # the client went away: the test says whether that was wrong
        finally:
            self.writers.discard(writer)
            writer.close()
