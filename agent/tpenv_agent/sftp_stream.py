"""The agent's SFTP server on a port-forward stream of its own (issue 13, protocol §6).

A mount over the SSH connection's ``sftp`` subsystem shares that connection's one port-forward
stream with every other channel, and each byte pays SSH's framing and encryption on top of the
API server's TLS: tpenv's mount read ran at 0.61 of sshfs to OpenSSH's ``sftp-server`` over a
plain ``kubectl port-forward`` (docs/performance.md, "the SFTP mount rows"). So a client may open
a stream of its own to the stream port (streams.py) and say ``TPENV-SFTP 1 <token>\\n`` instead of
a parked stream's hello; the agent answers ``+\\n`` and, from the next byte on, serves SFTP v3 on
the raw stream with the same :class:`~tpenv_agent.sftp.ConfinedSFTPServer` the subsystem runs.

Security is the parked streams': the API server authenticated and authorized the port-forward
(``pods/portforward``), the token (the SSH session's, given over its authenticated control
channel) proves the session, and the stream is closed with that session's SSH connection.

asyncssh's SFTP server reads and writes through an SSH channel's reader and writer; the two small
classes here are the part of those it uses (``readexactly``, ``write``, ``close``, whether the
channel is closing, the logger), over an asyncio stream.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from asyncssh.logging import logger as ssh_logger
from asyncssh.sftp import run_sftp_server

from . import log as logs

SFTP_MAGIC = b"TPENV-SFTP 1 "
SFTP_VERSION = 3  # what sshfs speaks, and what the subsystem serves (asyncssh's default)
READ_LIMIT = 1 << 20  # buffered requests above twice this pause the stream (backpressure to sshfs)
MAX_SFTP = 4  # SFTP streams per session: a mount each; more is a client gone wrong

ServerFactory = Callable[[Any], Any]  # (channel stand-in) -> an asyncssh.SFTPServer


class _Reader:
    """What asyncssh's SFTP handler reads through: an SSHReader's ``readexactly``, its logger and
    ``get_extra_info`` (the SSH client version, which does not exist here)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self.logger = ssh_logger.get_child("sftp-stream")

    async def readexactly(self, n: int) -> bytes:
        # asyncio.IncompleteReadError is an EOFError: the handler ends cleanly on it.
        return await self._reader.readexactly(n)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _Writer:
    """What it writes through: ``write``, ``close``, and ``channel.is_closing()``."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self.channel = self  # the handler asks the channel whether it is closing

    def write(self, data: bytes) -> None:
        self._transport.write(data)  # type: ignore[attr-defined]

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()


class SftpOverStream:
    """The SFTP server of one stream, fed by :class:`~tpenv_agent.streams.Stream` (the stream's
    protocol) once its hello was accepted; ends when either side closes."""

    def __init__(self, transport: asyncio.BaseTransport, server_factory: ServerFactory, session: str) -> None:
        self.log = logs.unit("sftp-stream", session or "?")
        self.reader = asyncio.StreamReader(limit=READ_LIMIT)
        self.reader.set_transport(transport)  # pauses the transport while requests pile up
        server = server_factory(None)  # ConfinedSFTPServer uses no channel: there is none here
        self.task = asyncio.ensure_future(
            run_sftp_server(server, _Reader(self.reader), _Writer(transport), SFTP_VERSION))  # type: ignore[arg-type]
        self.task.add_done_callback(self._ended)
        self.log.info("serving SFTP on a stream of its own")

    def data_received(self, data: bytes) -> None:
        self.reader.feed_data(data)

    def eof_received(self) -> None:
        self.reader.feed_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.reader.feed_eof()  # the handler's read ends: it closes its files and exits

    def _ended(self, task: asyncio.Task) -> None:
        if task.cancelled():
            self.log.info("SFTP stream cancelled")
        elif task.exception() is not None:
            self.log.warning("SFTP stream failed: %r", task.exception())
        else:
            self.log.info("SFTP stream ended")
