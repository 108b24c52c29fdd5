"""SPDY/3 framing: frame constants, encode/decode and header-block compression. Pure: no I/O.

SPDY draft 3, which 3.1 keeps (3.1 adds the session window: WINDOW_UPDATE on stream 0):
control frames SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS,
WINDOW_UPDATE, and DATA frames. Header blocks are zlib streams primed with the SPDY/3
dictionary, one compression context per direction for the whole session (a block is flushed
with Z_SYNC_FLUSH, never ended): that is why the compressor and the parser are objects a
session keeps, not functions. Kept apart from :mod:`tpenv.kits.spdy_session` so the codec can
be checked byte for byte (against Go's output) without a socket.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from tpenv.errors import TunnelDropped

VERSION = 3

# Frame types (SPDY/3 section 2.6); DATA is not a control type, 0 stands for it here.
DATA, SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 0, 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
# RST_STREAM status codes.
PROTOCOL_ERROR, INVALID_STREAM, REFUSED_STREAM, CANCEL, FLOW_CONTROL_ERROR = 1, 2, 3, 5, 7
RST_STATUS_NAMES = {1: "PROTOCOL_ERROR", 2: "INVALID_STREAM", 3: "REFUSED_STREAM", 4: "UNSUPPORTED_VERSION",
                    5: "CANCEL", 6: "INTERNAL_ERROR", 7: "FLOW_CONTROL_ERROR", 8: "STREAM_IN_USE",
                    9: "STREAM_ALREADY_CLOSED", 10: "INVALID_CREDENTIALS", 11: "FRAME_TOO_LARGE"}
SETTINGS_INITIAL_WINDOW_SIZE = 7
DEFAULT_WINDOW = 64 * 1024
MAX_LENGTH = (1 << 24) - 1  # the 24-bit length field


def _dictionary() -> bytes:
    """The SPDY/3 header dictionary (draft 3, 2.6.10.1): length-prefixed names and values, then a tail."""
    words = (
        "options head post put delete trace accept accept-charset accept-encoding accept-language accept-ranges "
        "age allow authorization cache-control connection content-base content-encoding content-language "
        "content-length content-location content-md5 content-range content-type date etag expect expires from "
        "host if-match if-modified-since if-none-match if-range if-unmodified-since last-modified location "
        "max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after server te trailer "
        "transfer-encoding upgrade user-agent vary via warning www-authenticate method get status").split()
    words += ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
    tail = ("100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
            "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
            "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
            "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
            "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
            "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.")
    return b"".join(struct.pack(">I", len(w)) + w.encode() for w in words) + tail.encode()


DICTIONARY = _dictionary()


class SpdyProtocolError(TunnelDropped):
    """The peer sent bytes that are not SPDY/3 (or a frame we cannot accept): the session ends."""


@dataclass
class Frame:
    """One frame, decoded. ``kind`` is DATA or a control type; fields unused by a kind stay default."""

    kind: int
    stream_id: int = 0
    flags: int = 0
    data: bytes = b""  # DATA payload
    headers: dict[str, str] | None = None  # SYN_STREAM, SYN_REPLY, HEADERS
    status: int = 0  # RST_STREAM, GOAWAY
    value: int = 0  # PING id, WINDOW_UPDATE delta, GOAWAY last-good stream id, SYN_STREAM associated id
    priority: int = 0
    settings: dict[int, int] = field(default_factory=dict)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


def pack_header_block(headers: dict[str, str]) -> bytes:
    """The uncompressed name/value block: count, then length-prefixed lowercase names and values."""
    out = [struct.pack(">I", len(headers))]
    for name, value in headers.items():
        n, v = name.lower().encode(), value.encode()
        out.append(struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v)
    return b"".join(out)


def unpack_header_block(block: bytes) -> dict[str, str]:
    """Inverse of :func:`pack_header_block`; several values of one name (NUL-separated) stay joined by NUL."""
    try:
        (count,), pos = struct.unpack_from(">I", block), 4
        headers: dict[str, str] = {}
        for _ in range(count):
            (n,) = struct.unpack_from(">I", block, pos)
            name = block[pos + 4:pos + 4 + n]
            pos += 4 + n
            (v,) = struct.unpack_from(">I", block, pos)
            value = block[pos + 4:pos + 4 + v]
            pos += 4 + v
            if len(name) != n or len(value) != v:
                raise SpdyProtocolError("header block truncated")
            headers[name.decode("utf-8", "surrogateescape").lower()] = value.decode("utf-8", "surrogateescape")
    except struct.error as e:
        raise SpdyProtocolError(f"header block truncated ({e})") from e
    if pos != len(block):
        raise SpdyProtocolError(f"header block has {len(block) - pos} bytes after its {count} headers")
    return headers


class HeaderCompressor:
    """The sending side's zlib context: one per session, primed with the dictionary, never ended."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, DICTIONARY)

    def compress(self, headers: dict[str, str]) -> bytes:
        return self._z.compress(pack_header_block(headers)) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """The receiving side's zlib context; each block ends on a sync flush, so it decodes whole."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(15, zdict=DICTIONARY)

    def decompress(self, data: bytes) -> dict[str, str]:
        try:
            block = self._z.decompress(data)
        except zlib.error as e:
            raise SpdyProtocolError(f"header block does not inflate ({e})") from e
        return unpack_header_block(block)


def _control(kind: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_LENGTH:
        raise ValueError(f"control frame payload of {len(payload)} bytes is too long")
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_head(stream_id: int, length: int, *, fin: bool = False) -> bytes:
    """The 8 bytes before a DATA frame's ``length`` bytes of payload."""
    if length > MAX_LENGTH:
        raise ValueError(f"data frame of {length} bytes is too long")
    return struct.pack(">II", stream_id & 0x7FFFFFFF, ((FLAG_FIN if fin else 0) << 24) | length)


def encode_data(stream_id: int, data: bytes = b"", *, fin: bool = False) -> bytes:
    return data_head(stream_id, len(data), fin=fin) + data


def encode(frame: Frame, compressor: HeaderCompressor | None = None) -> bytes:
    """Bytes of one frame; a compressor is needed for the kinds that carry headers."""
    k, sid = frame.kind, frame.stream_id & 0x7FFFFFFF
    if k == DATA:
        return encode_data(sid, frame.data, fin=frame.fin)
    if k in (SYN_STREAM, SYN_REPLY, HEADERS):
        if compressor is None:
            raise ValueError("a header-carrying frame needs the session's compressor")
        block = compressor.compress(frame.headers or {})
        if k == SYN_STREAM:
            head = struct.pack(">IIBB", sid, frame.value & 0x7FFFFFFF, (frame.priority & 0x7) << 5, 0)
        else:
            head = struct.pack(">I", sid)
        return _control(k, frame.flags, head + block)
    if k == RST_STREAM:
        return _control(k, 0, struct.pack(">II", sid, frame.status))
    if k == SETTINGS:
        body = struct.pack(">I", len(frame.settings))
        body += b"".join(struct.pack(">II", i & 0xFFFFFF, v) for i, v in frame.settings.items())
        return _control(k, frame.flags, body)
    if k == PING:
        return _control(k, 0, struct.pack(">I", frame.value))
    if k == GOAWAY:
        return _control(k, 0, struct.pack(">II", frame.value & 0x7FFFFFFF, frame.status))
    if k == WINDOW_UPDATE:
        return _control(k, 0, struct.pack(">II", sid, frame.value & 0x7FFFFFFF))
    raise ValueError(f"cannot encode frame kind {k}")


def _decode_control(kind: int, flags: int, body: bytes, dec: HeaderDecompressor) -> Frame | None:
    try:
        if kind == SYN_STREAM:
            sid, assoc, prio, _slot = struct.unpack_from(">IIBB", body)
            return Frame(SYN_STREAM, sid & 0x7FFFFFFF, flags, headers=dec.decompress(body[10:]),
                         value=assoc & 0x7FFFFFFF, priority=prio >> 5)
        if kind in (SYN_REPLY, HEADERS):
            (sid,) = struct.unpack_from(">I", body)
            return Frame(kind, sid & 0x7FFFFFFF, flags, headers=dec.decompress(body[4:]))
        if kind == RST_STREAM:
            sid, status = struct.unpack(">II", body)
            return Frame(RST_STREAM, sid & 0x7FFFFFFF, flags, status=status)
        if kind == SETTINGS:
            (n,) = struct.unpack_from(">I", body)
            if len(body) != 4 + 8 * n:
                raise SpdyProtocolError(f"SETTINGS frame of {len(body)} bytes for {n} entries")
            pairs = (struct.unpack_from(">II", body, 4 + 8 * i) for i in range(n))
            return Frame(SETTINGS, 0, flags, settings={i & 0xFFFFFF: v for i, v in pairs})
        if kind == PING:
            (pid,) = struct.unpack(">I", body)
            return Frame(PING, 0, flags, value=pid)
        if kind == GOAWAY:
            last, status = struct.unpack(">II", body) if len(body) == 8 else (struct.unpack(">I", body)[0], 0)
            return Frame(GOAWAY, 0, flags, value=last & 0x7FFFFFFF, status=status)
        if kind == WINDOW_UPDATE:
            sid, delta = struct.unpack(">II", body)
            return Frame(WINDOW_UPDATE, sid & 0x7FFFFFFF, flags, value=delta & 0x7FFFFFFF)
    except struct.error as e:
        raise SpdyProtocolError(f"control frame {kind} has a bad length ({len(body)} bytes)") from e
    return None  # NOOP, CREDENTIAL, unknown: the spec says ignore


class FrameParser:
    """Incremental decoder: feed bytes as they come, take the complete frames out.

    Frames whole inside a chunk are cut from it with one copy each (a DATA frame's payload is
    most of an intercept's bytes); only a frame split across two chunks is put together here."""

    def __init__(self) -> None:
        self._buf = bytearray()  # the start of a frame the next chunk completes
        self._dec = HeaderDecompressor()

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        view = memoryview(data)
        pos, end = 0, len(view)
        if self._buf:
            buf = self._buf
            if len(buf) < 8:
                pos = min(8 - len(buf), end)
                buf += view[:pos]
                if len(buf) < 8:
                    return frames
            need = 8 + (int.from_bytes(buf[5:8], "big")) - len(buf)
            take = min(need, end - pos)
            buf += view[pos:pos + take]
            pos += take
            if take < need:
                return frames
            self._buf = bytearray()
            word, flen = struct.unpack_from(">II", buf, 0)
            self._frame(word, flen, bytes(buf[8:]), frames)
        while end - pos >= 8:
            word, flen = struct.unpack_from(">II", view, pos)
            length = flen & 0xFFFFFF
            if end - pos < 8 + length:
                break
            self._frame(word, flen, bytes(view[pos + 8:pos + 8 + length]), frames)
            pos += 8 + length
        if pos < end:
            self._buf = bytearray(view[pos:])
        return frames

    def _frame(self, word: int, flen: int, body: bytes, frames: list[Frame]) -> None:
        flags = flen >> 24
        if word & 0x80000000:
            version, kind = (word >> 16) & 0x7FFF, word & 0xFFFF
            if version != VERSION:
                raise SpdyProtocolError(f"SPDY version {version} frame (expected {VERSION})")
            frame = _decode_control(kind, flags, body, self._dec)
            if frame is not None:
                frames.append(frame)
        else:
            frames.append(Frame(DATA, word & 0x7FFFFFFF, flags, data=body))

