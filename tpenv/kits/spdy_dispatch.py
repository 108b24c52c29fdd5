"""What the server's SPDY/3.1 frames do to a session (:class:`FrameDispatch`, a part of
:class:`~tpenv.kits.spdy_session.SpdySession`): DATA into the stream's owner and the receive
windows, SYN_REPLY and FIN, RST_STREAM and GOAWAY resetting streams, SETTINGS and WINDOW_UPDATE
opening the peer's windows, PING echoed or answered, a server push refused.

Apart from the session (which opens, writes, schedules and closes) so that the receiving side
reads in one place; it runs in the same Protocol callbacks, with the session's state.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tpenv.errors import TunnelDropped
from tpenv.kits.spdy_frames import (DATA, GOAWAY, HEADERS, PING, REFUSED_STREAM, RST_STATUS_NAMES, RST_STREAM,
                                    SETTINGS, SETTINGS_INITIAL_WINDOW_SIZE, SYN_REPLY, SYN_STREAM, WINDOW_UPDATE,
                                    Frame, encode)

if TYPE_CHECKING:
    from tpenv.kits.spdy_stream import SpdyStream

log = logging.getLogger("tpenv.spdy.session")


class FrameDispatch:
    """The receiving half of SpdySession; every attribute and helper it uses is the session's."""

    def _dispatch(self, f: Frame) -> None:
        k = f.kind
        if k == DATA:
            self.recv_window -= len(f.data)
            s = self.streams.get(f.stream_id)
            if s is None or s.reset:
                self._session_consumed(len(f.data))  # late data for a stream we dropped
                return
            s.recv_window -= len(f.data)
            if f.data:
                s.owner._stream_data(s, f.data)
            if f.fin:
                self._remote_fin(s)
        elif k == SYN_REPLY:
            s = self.streams.get(f.stream_id)
            if s is not None and not s.replied.done():
                s.replied.set_result(None)
                if s.outbuf or s.fin_pending:
                    self._schedule(s)
                if f.fin:
                    self._remote_fin(s)
        elif k == HEADERS:
            s = self.streams.get(f.stream_id)
            if s is not None and f.fin:
                self._remote_fin(s)
        elif k == RST_STREAM:
            s = self.streams.pop(f.stream_id, None)
            if s is not None:
                self._peer_reset(s, RST_STATUS_NAMES.get(f.status, f"status {f.status}"))
                self._maybe_idle()
        elif k == SETTINGS:
            new = f.settings.get(SETTINGS_INITIAL_WINDOW_SIZE)
            if new is not None:
                self.peer_flow_control = True
                delta, self.peer_initial_window = new - self.peer_initial_window, new
                for s in self.streams.values():
                    s.send_window += delta
                self._unblock()
        elif k == PING:
            if f.value % 2 == 0:  # the server's ping: echo it
                self._write(encode(Frame(PING, value=f.value)))
            else:
                self.keepalive.answered(f.value)
        elif k == GOAWAY:
            self._going_away = True
            log.debug("[spdy/%s] GOAWAY from the server (last good stream %d, status %d)",
                      self.name, f.value, f.status)
            for sid in [sid for sid in self.streams if sid > f.value]:
                self._peer_reset(self.streams.pop(sid), "the server is going away (GOAWAY)")
            self._maybe_idle()
        elif k == WINDOW_UPDATE:
            self.peer_flow_control = True
            if f.stream_id == 0:
                self.send_window += f.value
            elif (s := self.streams.get(f.stream_id)) is not None:
                s.send_window += f.value
            # else: a late update for a finished stream; ignored (draft 3, 2.6.8)
            self._unblock()
        elif k == SYN_STREAM:  # a server push has no use in port-forward
            self._write(encode(Frame(RST_STREAM, f.stream_id, status=REFUSED_STREAM)))

    def _peer_reset(self, s: SpdyStream, why: str) -> None:
        s.mark_reset()
        if not s.replied.done():
            s.replied.set_exception(TunnelDropped(f"port-forward {self.name}: stream refused ({why})"))
        s.owner._stream_reset(s, why)

    def _remote_fin(self, s: SpdyStream) -> None:
        if s.remote_closed:
            return
        s.remote_closed = True
        s.owner._stream_fin(s)
        self._maybe_forget(s)
