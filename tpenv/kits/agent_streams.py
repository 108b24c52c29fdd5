"""The client's parked port-forward streams: intercepted connections outside SSH (protocol §4.1).

An :class:`~tpenv.kits.agent_client.AgentSession` that intercepts keeps ``size`` streams open to
the agent's stream port (through the same tunnel as its SSH connection: a port-forward stream
each), each introduced by the session's token. The agent hands an intercepted connection to one
of them with a line naming the forward and a stream id; we connect to the intercept's handler on
this machine, answer ``+`` (or ``-``: the agent sends the connection to the app) and the bytes
flow raw both ways: no SSH framing or encryption, and no queueing behind other connections. A
stream taken is replaced at once. A port-forward stream cannot half-close, so the end of one
direction goes as ``{"eof": id, "bytes": n}`` on the session's ``tpenv-streams`` channel, and is
passed on here after n bytes came (agent/tpenv_agent/streams.py has the agent's half).

Everything here is a fast path: a stream that cannot be opened is retried with a backoff, and
meanwhile the agent uses SSH channels.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any, Callable

from tpenv.kits.aio import Backoff
from tpenv_agent.streams import MAGIC, EofLedger, eof_line, parse_eof

MAX_HEADER = 300
HEADER = re.compile(rb"(\d{1,9}) (\d{1,5}) (\S{1,255}) (\d{1,5})")

Connect = Callable[..., Any]  # async (protocol_factory, host, port) -> (transport, protocol)
Route = Callable[[int], "tuple[int, Any] | None"]  # forward port -> (local port, inflight counter)


class StreamPool:
    """``size`` parked streams for one session; ``close()`` safe twice."""

    def __init__(self, connect: Connect, host: str, port: int, token: str, route: Route, *, size: int,
                 log: Any, events_writer: Any, retry_initial: float = 0.5, retry_max: float = 10.0) -> None:
        self._connect, self._host, self._port = connect, host, port
        self._hello = MAGIC + token.encode("ascii") + b"\n"
        self.route = route
        self.size = size
        self.log = log
        self._events = events_writer
        self.parked = 0  # open or opening, not yet taken
        self.ready = 0  # of those, accepted by the agent
        self.taken = 0  # connections carried, in all
        self.live: dict[int, ClientStream] = {}
        self._tasks: set[asyncio.Task] = set()
        self._backoff = Backoff(retry_initial, retry_max)
        self._closed = False
        self._failing = False

    def start(self) -> None:
        # One at a time: the first fill happens while `up` waits for its route probe and first
        # answer, on the same cores; each open stream then asks for the next (``_open``).
        if self.parked < self.size:
            self._park()

    def _park(self, delay: float = 0.0) -> None:
        if self._closed:
            return
        self.parked += 1
        task = asyncio.ensure_future(self._open(delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        try:
            await self._connect(lambda: ClientStream(self), self._host, self._port)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the SSH path carries the connections meanwhile
            self.parked -= 1
            self._failed(f"{type(e).__name__}: {e}")
            return
        if self.parked < self.size:
            self._park()

    def _failed(self, why: str) -> None:
        if not self._failing:
            self._failing = True
            self.log.info("cannot park a stream (%s); retrying, SSH channels meanwhile", why)
        self._park(self._backoff.failed())

    def was_taken(self, stream: "ClientStream") -> None:
        if self._failing:
            self._failing = False
            self.log.info("streams parked again")
        self._backoff.reset()
        self.parked -= 1
        self.ready -= 1
        self.taken += 1
        self.live[stream.sid] = stream
        self._park()

    def was_lost(self, stream: "ClientStream") -> None:
        if stream.phase in ("hello", "parked"):  # the agent dropped it, or the tunnel went: another, after a backoff
            self.parked -= 1
            self.ready -= stream.phase == "parked"
            if not self._closed:
                self._failed("closed while parked")
        self.live.pop(stream.sid, None)

    def send_eof(self, sid: int, count: int) -> None:
        try:
            self._events.write(eof_line(sid, count))
        except Exception as e:  # the channel is gone: the session is ending; close the stream
            self.log.debug("eof of stream %d not sent: %s", sid, e)
            stream = self.live.get(sid)
            if stream is not None:
                stream.abort()

    def remote_eof(self, sid: int, count: int) -> None:
        stream = self.live.get(sid)
        if stream is not None:
            stream.remote_eof(count)

    async def read_events(self, reader: Any) -> None:
        """The agent's side of ``tpenv-streams``: its EOFs, until the channel ends."""
        while True:
            line = await reader.readline()
            if not line:
                return
            eof = parse_eof(line)
            if eof is not None:
                self.remote_eof(*eof)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        for stream in list(self.live.values()):
            stream.abort()


class ClientStream(EofLedger, asyncio.Protocol):
    """One parked stream: hello, wait for the agent's line, then splice to the local handler."""

    def __init__(self, pool: StreamPool) -> None:
        self.pool = pool
        self.transport: Any = None
        self.phase = "hello"  # hello (sent, unanswered), parked, taken, joined, closed
        self.buf = bytearray()
        self.sid = 0
        self.local: LocalHalf | None = None
        self.inflight: Any = None
        self.sent = 0  # bytes from the handler written to the agent (``received``: the other way)

    # --- the port-forward stream -----------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.pool._hello)

    def data_received(self, data: bytes) -> None:
        if self.phase == "joined":
            self.received += len(data)
            self.local.transport.write(data)  # type: ignore[union-attr]
            self._maybe_eof()
            return
        if self.phase not in ("hello", "parked"):  # nothing comes between the agent's line and our answer
            self.abort()
            return
        self.buf += data
        while self.phase in ("hello", "parked"):
            end = self.buf.find(b"\n")
            if end < 0:
                if len(self.buf) > MAX_HEADER:
                    self.abort()
                return
            line = bytes(self.buf[:end])
            del self.buf[:end + 1]
            if self.phase == "hello":
                if line != b"+":
                    return self._bad(line)
                self.phase = "parked"
                self.pool.ready += 1
                continue
            m = HEADER.fullmatch(line)
            if m is None or self.buf:
                return self._bad(line)
            self.sid, self.phase = int(m.group(1)), "taken"
            self.pool.was_taken(self)
            asyncio.ensure_future(self._join(int(m.group(2))))

    def _bad(self, line: bytes) -> None:
        self.pool.log.warning("an unexpected line from the agent on a parked stream (%r); closed", line[:40])
        self.abort()

    async def _join(self, forward_port: int) -> None:
        route = self.pool.route(forward_port)
        if route is None:  # left meanwhile: the agent sends it to the app
            self._refuse()
            return
        local_port, self.inflight = route
        self.inflight.opened()
        try:
            await asyncio.get_running_loop().create_connection(lambda: LocalHalf(self), "127.0.0.1", local_port)
        except OSError:
            self.inflight.closed()
            self.inflight = None
            self._refuse()
            return
        if self.transport.is_closing():
            self.local.transport.abort()  # type: ignore[union-attr]
            return
        self.phase = "joined"
        self.pool.log.debug("stream %d joined to 127.0.0.1:%d", self.sid, local_port)
        self.transport.write(b"+")
        self.local.transport.resume_reading()  # type: ignore[union-attr]
        self._maybe_eof()

    def _refuse(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(b"-")
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # a port-forward stream ends as a whole

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.was_lost(self)
        self.phase = "closed"
        if self.local is not None and self.local.transport is not None:
            # Everything that came was written; the handler gets it before the close.
            self.local.transport.close()

    def pause_writing(self) -> None:
        if self.local is not None and self.local.transport is not None:
            self.local.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.local is not None and self.local.transport is not None:
            self.local.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- out-of-band EOFs (EofLedger) -------------------------------------------------------
    def _give_eof(self) -> None:
        try:
            self.local.transport.write_eof()  # type: ignore[union-attr]
        except (OSError, RuntimeError):
            self.local.transport.close()  # type: ignore[union-attr]

    def _send_eof(self) -> None:
        self.pool.send_eof(self.sid, self.sent)

    def _done(self) -> None:
        self.transport.close()
        self.local.transport.close()  # type: ignore[union-attr]


class LocalHalf(asyncio.Protocol):
    """The connection to the handler on this machine (reading paused until the agent has our ``+``)."""

    def __init__(self, stream: ClientStream) -> None:
        self.stream = stream
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.stream.local = self
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.stream.sent += len(data)
        self.stream.transport.write(data)

    def eof_received(self) -> bool:
        self.stream.local_eof()
        return True  # the answer may still be written to it

    def connection_lost(self, exc: Exception | None) -> None:
        s = self.stream
        if s.inflight is not None:
            s.inflight.closed()
            s.inflight = None
        if not s.transport.is_closing():
            s.transport.close()

    def pause_writing(self) -> None:
        self.stream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.stream.transport.resume_reading()
