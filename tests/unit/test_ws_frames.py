"""RFC 6455 framing without sockets (tpenv/kits/ws_frames.py): server frames made here by hand, fed
in every split (a byte at a time, all at once), fragmented, with control frames between the
fragments and every length form; client frames unmasked again and compared. The same parser
against real servers: tests/unit/test_ws_client.py."""
from __future__ import annotations

import os
import struct

import pytest

from tpenv.kits import ws_frames as wf


def server_frame(opcode: int, payload: bytes, fin: bool = True, *, mask: bytes | None = None) -> bytes:
    """A frame as a server sends it (unmasked, unless ``mask`` makes it a bad one)."""
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, m | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if mask:
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


class Collect:
    def __init__(self, size: int = 4096) -> None:
        self.messages: list[bytearray] = []
        self.controls: list[tuple[int, bytes]] = []
        self.parser = wf.FrameParser(self.piece, self.control, size=size)

    def piece(self, first: bool, piece: memoryview) -> None:
        if first:
            self.messages.append(bytearray())
        self.messages[-1] += piece  # copied before the next read, as the parser asks

    def control(self, opcode: int, payload: bytes) -> None:
        self.controls.append((opcode, payload))

    def feed(self, data: bytes, step: int) -> None:
        """Read ``data`` as a transport would: at most ``step`` bytes and what the buffer takes per read."""
        i = 0
        while i < len(data):
            buf = self.parser.get_buffer()
            chunk = data[i:i + min(step, len(buf))]
            buf[:len(chunk)] = chunk
            self.parser.feed(len(chunk))
            i += len(chunk)


BIG = os.urandom(70_000)  # > 64 KiB: the 64-bit length form
MID = os.urandom(300)  # the 16-bit length form
STREAM = (server_frame(wf.BINARY, b"\x00" + MID)
          + server_frame(wf.BINARY, b"\x01ab", fin=False)  # a message in three fragments,
          + server_frame(wf.PING, b"hb")  # a ping between them,
          + server_frame(wf.CONT, b"", fin=False)  # an empty one among them,
          + server_frame(wf.CONT, b"cd")
          + server_frame(wf.TEXT, b"skipped: text is not ours")
          + server_frame(wf.BINARY, b"")  # an empty message: no piece at all
          + server_frame(wf.BINARY, BIG)
          + server_frame(wf.CLOSE, struct.pack("!H", 1000) + b"bye"))


@pytest.mark.parametrize("step", [1, 2, 3, 7, 125, 4096, len(STREAM)])
def test_every_split_of_the_stream_gives_the_same_messages_and_controls(step):
    # Small buffer (4 KiB) on purpose: the 70 000-byte frame passes through it in pieces.
    c = Collect()
    c.feed(STREAM, step)
    assert [bytes(m) for m in c.messages] == [b"\x00" + MID, b"\x01abcd", BIG]
    assert c.controls == [(wf.PING, b"hb"), (wf.CLOSE, struct.pack("!H", 1000) + b"bye")]
    assert wf.parse_close(c.controls[-1][1]) == (1000, "bye")


@pytest.mark.parametrize("bad, why", [
    (server_frame(wf.BINARY, b"x", mask=b"abcd"), "mask"),
    (server_frame(wf.CONT, b"x"), "continuation"),
    (server_frame(wf.BINARY, b"x", fin=False) + server_frame(wf.BINARY, b"y"), "inside a fragmented"),
    (server_frame(0x3, b"x"), "reserved opcode"),
    (server_frame(wf.PING, b"x", fin=False), "control"),
    (bytes([0x80 | wf.BINARY | 0x40, 1]) + b"x", "RSV"),
])
def test_a_broken_server_frame_is_a_protocol_error(bad, why):
    c = Collect()
    with pytest.raises(wf.WebSocketProtocolError, match=why):
        c.feed(bad, len(bad))


def unmask(frame: bytes) -> tuple[int, bool, bytes]:
    b0, b1 = frame[0], frame[1]
    assert b1 & 0x80, "a client frame must be masked"
    n, at = b1 & 0x7F, 2
    if n == 126:
        n, at = struct.unpack("!H", frame[2:4])[0], 4
    elif n == 127:
        n, at = struct.unpack("!Q", frame[2:10])[0], 10
    key, body = frame[at:at + 4], frame[at + 4:]
    assert len(body) == n
    return b0 & 0x0F, bool(b0 & 0x80), bytes(b ^ key[i % 4] for i, b in enumerate(body))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70_001])
@pytest.mark.parametrize("prefix", [b"", b"\x00", b"\x05\x06\x07"])
def test_client_frames_unmask_to_prefix_and_payload(size, prefix):
    payload = os.urandom(size)
    opcode, fin, body = unmask(b"".join(wf.encode(wf.BINARY, memoryview(payload), prefix)))
    assert (opcode, fin, body) == (wf.BINARY, True, prefix + payload)


def test_the_fallback_mask_equals_the_c_mask():
    data, key = os.urandom(10_003), os.urandom(4)
    expected = bytes(b ^ key[i % 4] for i, b in enumerate(data))
    assert wf._translate_mask(data, key) == expected
    assert wf.apply_mask(data, key) == expected
