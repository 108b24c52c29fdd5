"""Port-forward streams parked by clients: intercepted connections outside SSH (issue 13, protocol §4.1).

Every channel of an SSH connection shares one port-forward stream: a small answer waits behind
whatever a bulk transfer has in flight, and every byte is encrypted twice (TLS to the API server,
then SSH). So a client also opens port-forward streams of its own to this loopback port and
parks them here; an intercepted connection takes one and its bytes cross raw, with no SSH in the
path. The API server authenticated and authorized each stream (``pods/portforward``); this port
adds the session's proof, since any process in the pod can reach the pod's loopback:

- the client's first line is ``TPENV-STREAM 1 <token>\\n``, the token a random 256-bit value
  this agent gave that SSH session in its hello answer (over the authenticated control
  channel); a wrong or late line (``HELLO_TIMEOUT``) closes the connection, nothing is sent on it;
  a right one is answered ``+\n``: the stream is parked;
- a parked stream belongs to its session: only that session's intercepts take it, and it is
  closed when the session's SSH connection ends;
- when a connection takes it, the agent writes ``<id> <forward port> <orig host> <orig port>\\n``
  (the client's tcpip-forward port names the intercept, as a forwarded-tcpip channel would);
  the client answers one byte, ``+`` (its handler accepted a connection) or ``-`` (refused: the
  agent sends the connection to the app, as for a refused SSH channel), then bytes flow raw.

A port-forward stream cannot half-close (the kubelet's port-forward ends the whole stream when
either direction ends), so an end of one direction travels out of band, on the session's
``tpenv-streams`` channel: ``{"eof": id, "bytes": n}``, n the bytes sent in that direction in
all. The receiver passes the EOF on once it has delivered n bytes; a stream is closed once both
directions have ended. With no stream parked (none opened yet, all in use, a client that parks
none, no ``tpenv-streams`` channel) the connection goes over an SSH channel as before: streams
are a fast path, never the only one.

The same port serves a session's SFTP on a stream of its own: a first line of
``TPENV-SFTP 1 <token>\n`` (sftp_stream.py).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import secrets
from typing import TYPE_CHECKING, Any

from . import log as logs
from .sftp_stream import MAX_SFTP, SFTP_MAGIC, ServerFactory, SftpOverStream

if TYPE_CHECKING:
    from .sshd import ConnState

MAGIC = b"TPENV-STREAM 1 "
HELLO_TIMEOUT = 5.0
ACK_TIMEOUT = 10.0  # the client connects to its handler on the laptop, then answers
MAX_HELLO = 128
MAX_PARKED = 32  # per session
MAX_PENDING = 64  # connections that have not said their line yet


class StreamPort:
    """The loopback listener; sessions register their token here (``ConnState``)."""

    def __init__(self, sftp_factory: ServerFactory | None = None) -> None:
        self.sessions: dict[bytes, "ConnState"] = {}
        self.sftp_factory = sftp_factory  # None: SFTP only as the SSH subsystem
        self.pending = 0
        self.log = logs.unit("streams", "port")
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.get_running_loop().create_server(lambda: Stream(self), host, port)
        return self._server.sockets[0].getsockname()[1]

    @property
    def port(self) -> int | None:
        return self._server.sockets[0].getsockname()[1] if self._server is not None else None

    def register(self, state: "ConnState") -> str:
        """A new token for this SSH session (hex, as the hello answer carries it)."""
        token = secrets.token_bytes(32)
        self.sessions[token] = state
        return token.hex()

    def forget(self, state: "ConnState") -> None:
        for token in [t for t, s in self.sessions.items() if s is state]:
            del self.sessions[token]

    def session_for(self, line: bytes, magic: bytes = MAGIC) -> "ConnState | None":
        if not line.startswith(magic):
            return None
        try:
            token = bytes.fromhex(line[len(magic):].decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return None
        for known, state in self.sessions.items():
            if hmac.compare_digest(known, token):
                return state
        return None

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()


def eof_line(sid: int, count: int) -> bytes:
    """The ``tpenv-streams`` message: stream ``sid``'s sender ended after ``count`` bytes in all."""
    return json.dumps({"eof": sid, "bytes": count}).encode() + b"\n"


def parse_eof(line: bytes) -> tuple[int, int] | None:
    """(sid, count) of a ``tpenv-streams`` line; None for anything else (ignored, as both ends do)."""
    try:
        msg = json.loads(line)
        sid, count = msg["eof"], msg["bytes"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(sid, int) and isinstance(count, int) and not isinstance(sid, bool) and not isinstance(count, bool):
        return sid, count
    return None


class Events:
    """One session's ``tpenv-streams`` channel: out-of-band EOFs, both ways, JSON lines."""

    def __init__(self, state: "ConnState", process: Any) -> None:
        self.state, self.process = state, process
        self.log = logs.unit("streams", state.username or "?")

    def send_eof(self, sid: int, count: int) -> None:
        try:
            self.process.stdout.write(eof_line(sid, count))
        except (OSError, RuntimeError, BrokenPipeError) as e:
            self.log.info("eof of stream %d not sent: %s", sid, type(e).__name__)

    async def run(self) -> None:
        self.state.events = self
        try:
            while True:
                line = await self.process.stdin.readline()
                if not line:
                    break
                eof = parse_eof(line)
                stream = self.state.live_streams.get(eof[0]) if eof is not None else None
                if stream is not None:
                    stream.remote_eof(eof[1])  # type: ignore[index]
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if self.state.events is self:
                self.state.events = None
            for stream in list(self.state.live_streams.values()):  # no way left to end them cleanly
                stream.abort()
            try:
                self.process.exit(0)
            except (OSError, RuntimeError):
                pass


class EofLedger:
    """The out-of-band EOF bookkeeping of one taken stream, the same at both ends (this agent's
    :class:`Stream`, the client's ``tpenv.kits.agent_streams.ClientStream``). A subclass counts
    ``received`` as it delivers bytes, calls :meth:`remote_eof` when the peer's EOF message
    comes and :meth:`local_eof` when its own side ended, and says what passing an EOF on
    (``_give_eof``), sending one (``_send_eof``) and ending the stream (``_done``) mean."""

    phase = ""
    received = 0  # bytes of the peer's direction delivered on this side
    eof_at: int | None = None  # the peer's bytes in all, once it ended its direction
    eof_given = False
    eof_sent = False

    def remote_eof(self, count: int) -> None:
        if self.eof_at is None:
            self.eof_at = count
            self._maybe_eof()

    def _maybe_eof(self) -> None:
        # Not before joined: the message can overtake the stream's own bytes (another path).
        if self.phase != "joined" or self.eof_at is None or self.eof_given or self.received < self.eof_at:
            return
        self.eof_given = True
        self._give_eof()
        self._maybe_done()

    def local_eof(self) -> None:
        if not self.eof_sent:
            self.eof_sent = True
            self._send_eof()
            self._maybe_done()

    def _maybe_done(self) -> None:
        if self.eof_sent and self.eof_given:
            self._done()

    def _give_eof(self) -> None:
        raise NotImplementedError

    def _send_eof(self) -> None:
        raise NotImplementedError

    def _done(self) -> None:
        raise NotImplementedError


class Stream(EofLedger, asyncio.Protocol):
    """One connection to the stream port, for its whole life: its hello, parked, taken (waiting
    for the client's ``+``), then joined to a protocol of ours through :class:`StreamTransport`."""

    def __init__(self, port: StreamPort) -> None:
        self.port = port
        self.transport: Any = None
        self.buf = bytearray()
        self.state: "ConnState | None" = None
        self.phase = "hello"
        self.timer: asyncio.TimerHandle | None = None
        self.counted = False
        self.ack: asyncio.Future | None = None
        self.sid = 0
        self.user: Any = None  # the protocol driving a taken stream, or its SFTP server
        self.facade: StreamTransport | None = None

    # --- the raw connection ----------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.port.pending >= MAX_PENDING:
            transport.abort()
            return
        self.port.pending += 1
        self.counted = True
        self.timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self._refuse, "no hello in time")

    def _settled(self) -> None:
        if self.counted:
            self.counted = False
            self.port.pending -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _refuse(self, why: str) -> None:
        self._settled()
        self.port.log.info("stream refused: %s", why)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.phase == "joined":
            self.received += len(data)
            self.user.data_received(data)
            self._maybe_eof()
        elif self.phase == "sftp":
            self.user.data_received(data)
        elif self.phase == "hello":
            self._hello(data)
        elif self.phase == "taken" and self.ack is not None:
            # The client's answer, one byte; its handler's first bytes may follow in the same read
            # (a server that speaks first): kept for the protocol that joins.
            if not self.ack.done():
                self.ack.set_result(data[:1] == b"+")
                data = data[1:]
            self.buf += data
        else:  # parked: a client sends nothing until a connection takes it
            self.port.log.info("bytes on a %s stream; closed", self.phase)
            self.transport.abort()

    def _hello(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\n")
        if end < 0:
            if len(self.buf) > MAX_HELLO:
                self._refuse("hello line too long")
            return
        if end + 1 != len(self.buf):
            self._refuse("bytes after the hello line")
            return
        line = bytes(self.buf[:end])
        self.buf.clear()
        if line.startswith(SFTP_MAGIC):
            self._sftp(line)
            return
        state = self.port.session_for(line)
        if state is None:
            self._refuse("unknown token")
            return
        self._settled()
        if len(state.streams) >= MAX_PARKED:
            self.transport.abort()
            return
        self.state, self.phase = state, "parked"
        state.streams.append(self)
        self.transport.write(b"+\n")  # parked: the client counts it as ready

    def _sftp(self, line: bytes) -> None:
        state = self.port.session_for(line, SFTP_MAGIC)
        if state is None or self.port.sftp_factory is None:
            self._refuse("unknown token" if state is None else "SFTP streams are not served")
            return
        self._settled()
        if len(state.sftp_streams) >= MAX_SFTP:
            self._refuse(f"more than {MAX_SFTP} SFTP streams for one session")
            return
        self.state, self.phase = state, "sftp"
        state.sftp_streams.add(self)
        self.transport.write(b"+\n")  # the client starts sshfs on it
        self.user = SftpOverStream(self.transport, self.port.sftp_factory, state.username)

    def eof_received(self) -> bool:
        # The client's port-forward stream ended as a whole (its WebSocket closed): both directions.
        if self.phase == "sftp":
            self.user.eof_received()
            return False  # the stream cannot half-close: closed
        if self.phase == "joined":
            if not self.eof_given:
                self.eof_given = True
                self.user.eof_received()
            self.transport.close()
        else:
            self.transport.abort()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._settled()
        if self.ack is not None and not self.ack.done():
            self.ack.set_result(False)
        if self.state is not None:
            try:
                self.state.streams.remove(self)
            except ValueError:
                pass
            self.state.live_streams.pop(self.sid, None)
            self.state.sftp_streams.discard(self)
        if self.phase in ("joined", "sftp"):
            self.phase = "closed"
            self.user.connection_lost(exc)
        self.phase = "closed"

    def pause_writing(self) -> None:
        if self.phase == "joined":
            self.user.pause_writing()

    def resume_writing(self) -> None:
        if self.phase == "joined":
            self.user.resume_writing()

    # --- out-of-band EOFs (EofLedger) -------------------------------------------------------
    def _give_eof(self) -> None:
        if not self.user.eof_received():
            self.transport.close()

    def _send_eof(self) -> None:
        events = self.state.events if self.state is not None else None
        if events is None:
            self.transport.close()
            return
        events.send_eof(self.sid, self.facade.sent if self.facade is not None else 0)

    def _done(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class StreamTransport(asyncio.Transport):
    """What a protocol of ours sees of a taken stream: a transport whose ``write_eof`` is the
    out-of-band EOF and whose bytes are counted for it."""

    def __init__(self, stream: Stream) -> None:
        super().__init__()
        self._s = stream
        self._real = stream.transport
        self.sent = 0

    def write(self, data: Any) -> None:
        self.sent += len(data)
        self._real.write(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        self._s.local_eof()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self._real.close()

    def abort(self) -> None:
        self._real.abort()

    def is_closing(self) -> bool:
        return self._real.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._real.pause_reading()

    def resume_reading(self) -> None:
        self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def set_protocol(self, protocol: Any) -> None:
        self._s.user = protocol

    def get_protocol(self) -> Any:
        return self._s.user


async def take(state: "ConnState", forward_port: int, orig: tuple[str, int], protocol: Any) -> Any:
    """A parked stream of ``state``'s session, announced for ``forward_port``, accepted by the
    client and now driving ``protocol`` (its ``connection_made`` is called with a
    :class:`StreamTransport`); None when none is parked or the session has no events channel.
    ConnectionRefusedError when the client refused it (its handler does not accept)."""
    if state.events is None:
        return None
    while state.streams:
        s: Stream = state.streams.popleft()
        if s.transport is None or s.transport.is_closing():
            continue
        state.next_stream += 1
        s.sid, s.phase = state.next_stream, "taken"
        state.live_streams[s.sid] = s  # from now on: the client's EOF message may come early
        s.ack = asyncio.get_running_loop().create_future()
        s.transport.write(f"{s.sid} {forward_port} {orig[0] or '-'} {int(orig[1] or 0)}\n".encode("ascii"))
        try:
            accepted = await asyncio.wait_for(s.ack, ACK_TIMEOUT)
        except asyncio.TimeoutError:
            accepted = False
        if not accepted:
            s.transport.abort()
            raise ConnectionRefusedError(f"the client refused stream {s.sid}")
        if s.transport.is_closing():
            raise ConnectionResetError(f"stream {s.sid} closed before it was joined")
        s.user, s.phase = protocol, "joined"
        s.facade = StreamTransport(s)
        protocol.connection_made(s.facade)
        if s.buf:
            early, s.buf = bytes(s.buf), bytearray()
            s.data_received(early)
        s._maybe_eof()  # an EOF message that came before the join
        return s.facade
    return None
