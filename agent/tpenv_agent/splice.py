"""Moving bytes: the raw passthrough splice (hot path) and stream helpers for the routed paths.

The passthrough splice is a pair of asyncio Protocols wired back to back: bytes go from one
transport's ``data_received`` straight into the other's ``write``, and flow control is the
transports' own: when one side's write buffer passes its high-water mark, ``pause_writing``
stops reading from the other side until it drains. No coroutine per chunk, no parsing. The
same half also fronts an SSH channel (asyncssh calls the same methods on a session), so an
all-TCP intercept uses it too.

Which read path runs depends on the loop (a Half is both a Protocol and a BufferedProtocol):
asyncio's selector loop sees a BufferedProtocol and reads into the half's own buffer
(``recv_into``, nothing allocated per read); uvloop treats any ``asyncio.Protocol`` as a
plain one and hands ``data_received`` a bytes object it made in C. On uvloop, once joined,
``data_received`` is the peer transport's ``write`` itself (``_shortcut``): a chunk crosses
the agent without one Python frame. (uvloop takes the buffered path only for a protocol that is
not an ``asyncio.Protocol``; it would not save the copy: its ``write`` keeps the object it is
given until the loop iteration ends, so a reused buffer would need copying anyway.) The bytes
object per read is a fresh 256000-byte allocation: ``main.keep_heap`` keeps glibc from
faulting in new pages for each one.
"""
from __future__ import annotations

import asyncio
import sys
from typing import Any

READ_SIZE = 256 * 1024
HIGH_WATER = 1024 * 1024


class Half(asyncio.Protocol, asyncio.BufferedProtocol):
    """One end of a splice. ``peer`` is the other end; until it is connected, reading pauses.

    On asyncio's loop a BufferedProtocol: the kernel reads into one buffer per half
    (``recv_into``), so the hot path allocates nothing per read; ``transport.write`` sends at
    once or copies what is left. uvloop and SSH channels (asyncssh sessions) call
    ``data_received`` instead.
    """

    def __init__(self) -> None:
        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)
        self.transport: Any = None
        self.peer: Half | None = None
        self.eof = False
        self.zero_copy = False
        self.closed = asyncio.get_running_loop().create_future()
        # Bytes read before the peer is joined. pause_reading() in connection_made should make
        # this impossible, but CPython before 3.11.4 (Debian bookworm's 3.11.2, the agent image)
        # re-adds the reader right after connection_made, so early bytes do arrive.
        self.early = bytearray()

    # asyncio.Protocol / asyncssh session interface ---------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        try:
            transport.set_write_buffer_limits(high=HIGH_WATER)
        except (AttributeError, NotImplementedError):
            pass
        if self.peer is None or self.peer.transport is None:
            transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if self.peer is None or self.peer.transport is None:
            self._hold(self._view[:nbytes])
            return
        # Handing the peer a view of our buffer is safe only where its write() copies what it
        # cannot send at once: asyncio socket transports on 3.11 (3.12 queues the view as is)
        # but not SSH channels, which keep the object.
        if self.zero_copy:
            self.peer.transport.write(self._view[:nbytes])  # type: ignore[union-attr]
        else:
            self.peer.transport.write(bytes(self._view[:nbytes]))  # type: ignore[union-attr]

    def data_received(self, data: Any, datatype: Any = None) -> None:
        if self.peer is None or self.peer.transport is None:
            self._hold(data)
            return
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def _hold(self, data: Any) -> None:
        self.early += data
        if self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None:
            # Not joined yet: keep the half-closed connection; join() passes the EOF on.
            return True
        if peer.eof:
            # Both directions are done: close after the buffers flush.
            self.close()
            peer.close()
            return False
        try:
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
                return True
        except (OSError, RuntimeError):
            pass
        peer.close()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.peer is not None:
            self.peer.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    # asyncssh-only callbacks
    def session_started(self) -> None:
        pass

    # ----------------------------------------------------------------------------------
    def can_shortcut(self) -> bool:
        """Whether every further byte may go to the peer unlooked-at (a subclass that still
        sniffs says no until it is done)."""
        return True

    def shortcut(self) -> None:
        """On uvloop: make ``data_received`` the peer transport's ``write`` (see the module doc).

        uvloop keeps the bound ``data_received`` it found when the protocol was set, so the
        protocol is set again to make it look once more. Only for a uvloop transport of our
        own (it calls ``data_received(data)``; asyncssh passes a datatype too, and asyncio's
        loop reads through ``buffer_updated``) and a joined peer with a transport.
        """
        peer = self.peer
        if peer is None or peer.transport is None or self.transport is None or self.transport.is_closing():
            return
        if not _is_uvloop(self.transport) or not self.can_shortcut():
            return
        self.data_received = peer.transport.write  # type: ignore[method-assign]
        self.transport.set_protocol(self)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            abort = getattr(self.transport, "abort", None)
            (abort or self.transport.close)()


def join(a: Half, b: Half) -> None:
    """Wire two connected halves together and start the bytes flowing."""
    a.peer, b.peer = b, a
    a.zero_copy = _copies_on_write(b.transport)
    b.zero_copy = _copies_on_write(a.transport)
    for src, dst in ((a, b), (b, a)):
        if src.early:
            dst.transport.write(bytes(src.early))
            src.early.clear()
    for src in (a, b):
        if src.eof:  # ended before the join: replay the EOF now that there is a peer
            src.eof = False
            if not src.eof_received():
                src.close()
    a.transport.resume_reading()
    b.transport.resume_reading()
    a.shortcut()
    b.shortcut()


def _is_uvloop(transport: Any) -> bool:
    return type(transport).__module__.startswith("uvloop")


def _copies_on_write(transport: Any) -> bool:
    return sys.version_info < (3, 12) and isinstance(transport, asyncio.Transport) \
        and type(transport).__name__ == "_SelectorSocketTransport"


class Buffered:
    """A reader with our own buffer over anything with ``async read(n)`` (StreamReader or
    asyncssh SSHReader), so both kinds behave the same at EOF and respect the same limits."""

    def __init__(self, reader: Any, initial: bytes = b"") -> None:
        self._reader = reader
        self._buf = bytearray(initial)
        self.eof = False

    async def _fill(self) -> bool:
        if self.eof:
            return False
        data = await self._reader.read(READ_SIZE)
        if not data:
            self.eof = True
            return False
        self._buf += data
        return True

    def buffered(self) -> int:
        return len(self._buf)

    async def read_some(self, n: int = READ_SIZE) -> bytes:
        """Up to ``n`` bytes; b'' only at EOF."""
        if not self._buf and not await self._fill():
            return b""
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def peek(self, n: int) -> bytes:
        """At least ``n`` bytes unless EOF comes first; nothing is consumed."""
        while len(self._buf) < n and await self._fill():
            pass
        return bytes(self._buf[:n])

    async def readuntil(self, sep: bytes, limit: int) -> bytes:
        """Up to and including ``sep``. b'' if EOF before any byte; ValueError past ``limit``;
        asyncio.IncompleteReadError if EOF comes mid-way."""
        start = 0
        while True:
            i = self._buf.find(sep, start)
            if i >= 0:
                out = bytes(self._buf[: i + len(sep)])
                del self._buf[: i + len(sep)]
                return out
            if len(self._buf) > limit:
                raise ValueError("line or header block too long")
            start = max(0, len(self._buf) - len(sep) + 1)
            if not await self._fill():
                if not self._buf:
                    return b""
                raise asyncio.IncompleteReadError(bytes(self._buf), None)

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not await self._fill():
                raise asyncio.IncompleteReadError(bytes(self._buf), n)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


async def pump(src: Buffered, writer: Any) -> None:
    """Copy until EOF, then half-close the writer if it can."""
    try:
        while True:
            data = await src.read_some()
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, ConnectionError, asyncio.IncompleteReadError, BrokenPipeError):
        pass


async def splice_streams(a_reader: Buffered, a_writer: Any, b_reader: Buffered, b_writer: Any) -> None:
    """Both directions until both are done; then close both writers."""
    try:
        await asyncio.gather(pump(a_reader, b_writer), pump(b_reader, a_writer))
    finally:
        close_writer(a_writer)
        close_writer(b_writer)


def close_writer(writer: Any) -> None:
    try:
        writer.close()
    except (OSError, RuntimeError):
        pass
