"""RFC 6455 framing for a WebSocket client, without I/O: server frames parsed in place, client frames made.

This is the byte path of every WebSocket port-forward stream (:mod:`tpenv.kits.ws_client`),
so it is built for bulk: the transport reads (or TLS decrypts) straight into the parser's
buffer (``get_buffer``/``feed``, an asyncio ``BufferedProtocol``'s two calls), and a data
frame's payload is handed on as ``memoryview`` pieces of that buffer as soon as they are
there, however large the frame (extended 16- and 64-bit lengths) and however it is split
across reads or fragmented into continuation frames. The consumer copies the pieces once
(it joins them) before the next read; what stays in the buffer between reads is never more
than a frame header or a control frame, so compacting it costs nothing.

The ``websockets`` library did the same work in three copies per frame (buffer append, frame
slice, message assembly) plus a future per message: about 0.9 s of CPU per 128 MiB.

Client frames are masked, as the RFC requires of a client, with ``websockets``' C
``apply_mask`` (30 GB/s) where it is built, else four ``bytes.translate`` passes (1 GB/s;
``int.from_bytes`` XOR measured 0.3-0.4 GB/s). Server frames must not be masked.
"""
from __future__ import annotations

import os
import struct
from typing import Callable

from tpenv.errors import TunnelDropped

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_NO_STATUS, CLOSE_PROTOCOL_ERROR = 1000, 1001, 1005, 1002
CLEAN_CLOSE_CODES = frozenset({CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_NO_STATUS})
BUFFER_SIZE = 256 * 1024  # one read: asyncio's TLS layer decrypts up to this much per call


class WebSocketProtocolError(TunnelDropped):
    """The server broke RFC 6455 (a masked frame, a bad length, a continuation out of place)."""


_XOR_TABLES: list[bytes] = []  # byte -> byte ^ k, for each k: made on first use


def _translate_mask(data: bytes | memoryview, key: bytes) -> bytes:
    if not _XOR_TABLES:
        _XOR_TABLES.extend(bytes(i ^ k for i in range(256)) for k in range(256))
    out = bytearray(data)
    for i in range(4):
        out[i::4] = out[i::4].translate(_XOR_TABLES[key[i]])
    return bytes(out)


try:
    from websockets.speedups import apply_mask as _c_mask
except ImportError:  # a websockets build without its C extension
    _c_mask = None

apply_mask: Callable[[bytes | memoryview, bytes], bytes] = _c_mask or _translate_mask


def _head(opcode: int, length: int, fin: bool = True) -> bytes:
    b0 = (0x80 if fin else 0) | opcode
    if length < 126:
        return struct.pack("!BB", b0, 0x80 | length)
    if length < 65536:
        return struct.pack("!BBH", b0, 0x80 | 126, length)
    return struct.pack("!BBQ", b0, 0x80 | 127, length)


def encode(opcode: int, payload: bytes | memoryview = b"", prefix: bytes = b"") -> list[bytes]:
    """One whole client frame as the buffers to write: header with mask key, masked ``prefix``
    and masked ``payload``. ``prefix`` (a port-forward channel byte) is masked on its own with
    the key turned to match, so ``payload`` is never concatenated: the mask makes the one copy."""
    key = os.urandom(4)
    parts = [_head(opcode, len(prefix) + len(payload)) + key]
    if prefix:
        parts.append(apply_mask(prefix, key))
        turn = len(prefix) % 4
        key = key[turn:] + key[:turn]
    if payload:
        parts.append(apply_mask(payload, key))
    return parts


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()[:123]


def parse_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a close frame; 1005 when it carries no code."""
    if len(payload) < 2:
        return CLOSE_NO_STATUS, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")


class FrameParser:
    """Server frames from the bytes read into :meth:`get_buffer`.

    ``on_piece(first, piece)`` gets every byte of every binary message in order, as memoryview
    pieces of the buffer, valid until the next :meth:`get_buffer`; ``first`` is true for a
    message's first non-empty piece. Text messages are skipped (the port-forward protocol we ask
    for is binary). ``on_control(opcode, payload)`` gets each close, ping and pong whole, also
    between the fragments of a message.
    """

    def __init__(self, on_piece: Callable[[bool, memoryview], None], on_control: Callable[[int, bytes], None],
                 *, size: int = BUFFER_SIZE) -> None:
        self.on_piece, self.on_control = on_piece, on_control  # the connection sets on_piece to its handler's
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0  # bytes before this are parsed
        self._end = 0  # bytes before this were read
        self._left = 0  # payload bytes of the current data frame still to come
        self._binary = True  # the current message is binary (else its bytes are skipped)
        self._first = False  # the next non-empty piece is its message's first
        self._open = False  # a fragmented message waits for its continuation frames

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._start:
            rest = self._end - self._start  # a header or a control frame: at most 131 bytes
            self._view[:rest] = bytes(self._view[self._start:self._end])
            self._start, self._end = 0, rest
        return self._view[self._end:]

    def load(self, data: bytes) -> None:
        """Put bytes read elsewhere (the first frames, read with the HTTP answer) ahead of the next read."""
        self.get_buffer()[:len(data)] = data
        self._end += len(data)

    def feed(self, n: int) -> None:
        """``n`` more bytes are in the buffer: parse them. Raises WebSocketProtocolError."""
        self._end += n
        self.parse()

    def parse(self) -> None:
        view, s, e = self._view, self._start, self._end
        try:
            while s < e:
                if self._left:
                    take = min(self._left, e - s)
                    if self._binary:
                        self.on_piece(self._first, view[s:s + take])
                        self._first = False
                    s += take
                    self._left -= take
                    continue
                if e - s < 2:
                    break
                b0, b1 = view[s], view[s + 1]
                if b0 & 0x70 or b1 & 0x80:
                    raise WebSocketProtocolError("the server sent a frame with RSV bits or a mask (RFC 6455 5.1, 5.2)")
                opcode, length, head = b0 & 0x0F, b1 & 0x7F, 2
                if length == 126:
                    if e - s < 4:
                        break
                    length, head = int.from_bytes(view[s + 2:s + 4], "big"), 4
                elif length == 127:
                    if e - s < 10:
                        break
                    length, head = int.from_bytes(view[s + 2:s + 10], "big"), 10
                    if length >> 63:
                        raise WebSocketProtocolError("the server sent a frame length with its top bit set")
                if opcode >= CLOSE:
                    if not b0 & 0x80 or head != 2:
                        raise WebSocketProtocolError("the server sent a fragmented or long control frame")
                    if e - s < 2 + length:
                        break
                    s += 2 + length
                    self._start = s
                    self.on_control(opcode, bytes(view[s - length:s]))
                    continue
                if opcode == CONT:
                    if not self._open:
                        raise WebSocketProtocolError("the server sent a continuation frame outside a message")
                elif opcode in (TEXT, BINARY):
                    if self._open:
                        raise WebSocketProtocolError("the server began a message inside a fragmented one")
                    self._binary, self._first = opcode == BINARY, True
                else:
                    raise WebSocketProtocolError(f"the server sent a frame with the reserved opcode {opcode:#x}")
                self._open = not b0 & 0x80
                self._left = length
                s += head
        finally:
            self._start = s


__all__ = ["FrameParser", "WebSocketProtocolError", "encode", "apply_mask", "close_payload", "parse_close",
           "CONT", "TEXT", "BINARY", "CLOSE", "PING", "PONG", "CLEAN_CLOSE_CODES", "CLOSE_NORMAL",
           "CLOSE_PROTOCOL_ERROR"]
