"""One SPDY stream of a session: its reply, windows, pending output and half-closes.

A stream is state, not I/O: it buffers what its owner writes and asks the session
(:mod:`tpenv.kits.spdy_session`) to put it on the wire, which does so in DATA frames as the
socket and the windows allow; the session tells the owner (:class:`StreamOwner`, the
port-forward transport of :mod:`tpenv.kits.spdy`) what arrives. Apart from the session so
that the session's module holds the connection's logic and this one a stream's.
"""
from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Protocol

from tpenv.kits.spdy_frames import CANCEL, DEFAULT_WINDOW, WINDOW_UPDATE, Frame, encode

if TYPE_CHECKING:
    from tpenv.kits.spdy_session import SpdySession


class StreamOwner(Protocol):
    """Who hears a stream's events (the port-forward transport)."""

    def _stream_data(self, stream: SpdyStream, data: bytes) -> None: ...

    def _stream_fin(self, stream: SpdyStream) -> None: ...

    def _stream_reset(self, stream: SpdyStream, why: str) -> None: ...

    def _stream_sent(self, stream: SpdyStream) -> None: ...


def quiet_future(loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """A future whose failure nobody has to await (a refused stream, a refused upgrade)."""
    fut = loop.create_future()
    fut.add_done_callback(_retrieve)
    return fut


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # a failure nobody awaits must not warn "never retrieved"


class OutBuf:
    """A stream's pending output, the writer's ``bytes`` queued as they are (no copy); a DATA
    frame's worth is taken as pieces (whole objects, or memoryview slices of the first one),
    which the TLS transport encrypts straight from: the one copy an outgoing byte gets here."""

    __slots__ = ("_parts", "_len")

    def __init__(self) -> None:
        self._parts: collections.deque[bytes | memoryview] = collections.deque()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def append(self, data: bytes) -> None:
        """``data`` must not change later: bytes, or a view of bytes."""
        if data:
            self._parts.append(data)
            self._len += len(data)

    def take(self, n: int) -> list[bytes | memoryview]:
        """Up to ``n`` bytes from the front, in order."""
        out: list[bytes | memoryview] = []
        parts = self._parts
        while n > 0 and parts:
            head = parts[0]
            if len(head) <= n:
                out.append(parts.popleft())
                n -= len(head)
                self._len -= len(head)
            else:
                view = memoryview(head)
                out.append(view[:n])
                parts[0] = view[n:]
                self._len -= n
                n = 0
        return out

    def clear(self) -> None:
        self._parts.clear()
        self._len = 0


class SpdyStream:
    """One SPDY stream's state: reply, windows, pending output, half-closes."""

    def __init__(self, session: SpdySession, stream_id: int, headers: dict[str, str], owner: StreamOwner) -> None:
        self.session = session
        self.id = stream_id
        self.headers = headers
        self.owner = owner
        self.replied: asyncio.Future[None] = quiet_future(session.loop)
        self.send_window = session.peer_initial_window
        self.recv_window = DEFAULT_WINDOW  # what the peer may still send (tracked; see spdy_session's doc)
        self.outbuf = OutBuf()
        self.fin_pending = False  # send a FIN once outbuf is out
        self.local_closed = False  # our FIN went out
        self.remote_closed = False  # the peer's FIN came
        self.reset = False
        self._unacked = 0  # consumed bytes not yet given back with WINDOW_UPDATE
        self._linger: asyncio.TimerHandle | None = None  # the session's: resets a stream the peer never ends

    def __repr__(self) -> str:
        return f"SpdyStream({self.id}, {self.headers.get('streamtype')})"

    @property
    def done(self) -> bool:
        return self.reset or (self.local_closed and self.remote_closed)

    def write(self, data: bytes) -> None:
        if self.local_closed or self.fin_pending or self.reset:
            return
        self.outbuf.append(data)
        self.session._schedule(self)

    def close_write(self) -> None:
        """Half-close: a FIN after what is buffered."""
        if self.local_closed or self.fin_pending or self.reset:
            return
        self.fin_pending = True
        self.session._schedule(self)

    def abort(self, status: int = CANCEL) -> None:
        if self.reset:
            return
        self.outbuf.clear()
        self.session._reset(self, status)

    def consumed(self, n: int) -> None:
        """The protocol took ``n`` bytes: give them back to the peer's windows."""
        self.session._session_consumed(n)
        self._unacked += n
        if self._unacked >= DEFAULT_WINDOW // 2 and not self.remote_closed and not self.reset:
            self.session.write_control(encode(Frame(WINDOW_UPDATE, self.id, value=self._unacked)))
            self.recv_window += self._unacked
            self._unacked = 0

    def mark_reset(self) -> None:
        """Reset either way (RST_STREAM sent or received): the stream is over, its linger timer too."""
        self.reset = True
        if self._linger is not None:
            self._linger.cancel()
