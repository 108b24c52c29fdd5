"""SPDY/3 framing and header compression (tpenv.kits.spdy_frames): layouts, round trips, a Go-produced vector."""
import struct
import zlib

import pytest
from hypothesis import given, strategies as st

from tpenv.kits.spdy_frames import (CANCEL, DATA, DICTIONARY, FLAG_FIN, GOAWAY, HEADERS, PING, RST_STREAM, SETTINGS,
                                    SYN_REPLY, SYN_STREAM, WINDOW_UPDATE, Frame, FrameParser, HeaderCompressor,
                                    HeaderDecompressor, SpdyProtocolError, encode, encode_data, pack_header_block,
                                    unpack_header_block)

# The first bytes the kubelet (Go, moby/spdystream) sent on a real session of the local cluster:
# the SYN_REPLYs of a port-forward's error (1) and data (3) streams, empty header blocks, the
# second compressed in the same zlib context as the first (captured with tpenv's session).
KUBELET_SYN_REPLIES = bytes.fromhex(
    "80030002000000140000000178f9e3c6a7c26260606000000000ffff"
    "800300020000000c00000003026100000000ffff")


# --- stage 1: the dictionary and hand-checked layouts -----------------------------------------------------------------

def test_dictionary_is_the_spdy3_one():
    # draft 3 section 2.6.10.1: 1423 bytes; zlib names a dictionary by its Adler-32 (the DICTID Go checks).
    assert len(DICTIONARY) == 1423 and zlib.adler32(DICTIONARY) == 0xE3C6A7C2
    assert DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head") and DICTIONARY.endswith(b",enq=0.")


def test_control_frame_layouts():
    assert encode(Frame(PING, value=1)) == bytes.fromhex("80030006 00000004 00000001")
    assert encode(Frame(RST_STREAM, 5, status=CANCEL)) == bytes.fromhex("80030003 00000008 00000005 00000005")
    assert encode(Frame(WINDOW_UPDATE, 3, value=32768)) == bytes.fromhex("80030009 00000008 00000003 00008000")
    assert encode(Frame(GOAWAY, value=7, status=0)) == bytes.fromhex("80030007 00000008 00000007 00000000")
    assert encode(Frame(SETTINGS, settings={7: 16384})) == \
        bytes.fromhex("80030004 0000000c 00000001 00000007 00004000")


def test_data_frame_layout_and_fin_flag():
    assert encode_data(3, b"abc") == bytes.fromhex("00000003 00000003 616263")
    assert encode_data(3, fin=True) == bytes.fromhex("00000003 01000000")
    assert encode(Frame(DATA, 0x7FFFFFFF, FLAG_FIN, data=b"x")) == bytes.fromhex("7fffffff 01000001 78")


def test_syn_stream_layout_and_zlib_header_with_dictionary_id():
    raw = encode(Frame(SYN_STREAM, 1, headers={"streamtype": "error", "port": "9000", "requestid": "0"}),
                 HeaderCompressor())
    version_type, flags_len, sid, assoc, prio, slot = struct.unpack_from(">IIIIBB", raw)
    assert (version_type, flags_len >> 24, flags_len & 0xFFFFFF) == (0x80030001, 0, len(raw) - 8)
    assert (sid, assoc, prio, slot) == (1, 0, 0, 0)
    # zlib header: deflate/32K window, best compression, FDICT, then the dictionary's Adler-32 (big-endian).
    assert raw[18:24] == bytes.fromhex("78f9e3c6a7c2")
    assert raw.endswith(b"\x00\x00\xff\xff")  # a sync flush: the stream continues in the next block


def test_header_block_layout():
    assert pack_header_block({"Port": "80"}) == bytes.fromhex("00000001 00000004") + b"port" + \
        bytes.fromhex("00000002") + b"80"


# --- stage 2: decoding Go's bytes, round trips ------------------------------------------------------------------------

def test_decodes_the_kubelets_syn_replies():
    frames = FrameParser().feed(KUBELET_SYN_REPLIES)
    assert [(f.kind, f.stream_id, f.flags, f.headers) for f in frames] == [(SYN_REPLY, 1, 0, {}), (SYN_REPLY, 3, 0, {})]


def test_the_second_block_needs_the_first_ones_context():
    # One decompression context per session: decoding the second frame alone must fail.
    second = KUBELET_SYN_REPLIES[28:]
    with pytest.raises(SpdyProtocolError):
        FrameParser().feed(second)


def test_byte_by_byte_feeding_gives_the_same_frames():
    p = FrameParser()
    frames = [f for b in KUBELET_SYN_REPLIES for f in p.feed(bytes([b]))]
    assert [f.stream_id for f in frames] == [1, 3]


def test_one_context_per_direction_across_many_blocks():
    comp, parser = HeaderCompressor(), FrameParser()
    wire = b""
    blocks = [{"streamtype": t, "port": str(p), "requestid": str(i)}
              for i, (t, p) in enumerate([("error", 80), ("data", 80), ("error", 9000), ("data", 9000)])]
    for i, h in enumerate(blocks):
        wire += encode(Frame(SYN_STREAM, 2 * i + 1, headers=h), comp)
    assert [f.headers for f in parser.feed(wire)] == blocks
    # Later blocks reuse earlier ones: the 4th compresses smaller than the 1st.
    sizes = []
    comp2 = HeaderCompressor()
    for h in blocks:
        sizes.append(len(comp2.compress(h)))
    assert sizes[3] < sizes[0]


frame_ids = st.integers(1, 0x7FFFFFFF)


@given(st.one_of(
    st.builds(lambda i, d, fin: Frame(DATA, i, FLAG_FIN if fin else 0, data=d), frame_ids,
              st.binary(max_size=300), st.booleans()),
    st.builds(lambda i, h, fin, prio: Frame(SYN_STREAM, i, FLAG_FIN if fin else 0, headers=h, priority=prio),
              frame_ids, st.dictionaries(st.text("abcdefgh-", min_size=1, max_size=8), st.text(max_size=20),
                                         max_size=4), st.booleans(), st.integers(0, 7)),
    st.builds(lambda i, h: Frame(SYN_REPLY, i, headers=h), frame_ids,
              st.dictionaries(st.text("xyz", min_size=1, max_size=3), st.text("0123", max_size=5), max_size=3)),
    st.builds(lambda i, h: Frame(HEADERS, i, FLAG_FIN, headers=h), frame_ids,
              st.dictionaries(st.text("pq", min_size=1, max_size=3), st.text("v", max_size=3), max_size=2)),
    st.builds(lambda i, s: Frame(RST_STREAM, i, status=s), frame_ids, st.integers(1, 11)),
    st.builds(lambda s: Frame(SETTINGS, settings=s), st.dictionaries(st.integers(1, 8), st.integers(0, 2**31))),
    st.builds(lambda v: Frame(PING, value=v), st.integers(1, 2**32 - 1)),
    st.builds(lambda v, s: Frame(GOAWAY, value=v, status=s), st.integers(0, 0x7FFFFFFF), st.integers(0, 2)),
    st.builds(lambda i, v: Frame(WINDOW_UPDATE, i, value=v), st.integers(0, 0x7FFFFFFF), st.integers(1, 0x7FFFFFFF)),
))
def test_round_trip(frame):
    comp, parser = HeaderCompressor(), FrameParser()
    wire = encode(frame, comp) + encode(frame, comp)  # twice: the second block goes through the same contexts
    assert parser.feed(wire) == [frame, frame]


@given(st.lists(st.tuples(st.integers(1, 99), st.binary(max_size=3000), st.booleans()), min_size=1, max_size=12),
       st.lists(st.integers(1, 4000), min_size=1, max_size=40))
def test_frames_come_out_whole_whatever_the_chunks(datas, cuts):
    # The parser cuts frames that lie inside a chunk and joins only a frame split across chunks:
    # any chunking of a stream of DATA and control frames gives the same frames as one feed.
    comp = HeaderCompressor()
    frames = [Frame(DATA, i, FLAG_FIN if fin else 0, data=d) for i, d, fin in datas]
    frames.insert(len(frames) // 2, Frame(SYN_REPLY, 3, headers={"a": "b"}))
    wire = b"".join(encode(f, comp) for f in frames)
    parser, got, at = FrameParser(), [], 0
    for n in cuts * (len(wire) // max(sum(cuts), 1) + 1):
        got += parser.feed(wire[at:at + n])
        at += n
        if at >= len(wire):
            break
    assert got == frames


# --- stage 3: what the parser refuses ----------------------------------------------------------------------------------

def test_wrong_version_is_a_protocol_error():
    with pytest.raises(SpdyProtocolError, match="version 2"):
        FrameParser().feed(bytes.fromhex("80020006 00000004 00000001"))


def test_truncated_header_block_is_a_protocol_error():
    with pytest.raises(SpdyProtocolError):
        unpack_header_block(bytes.fromhex("00000001 00000004") + b"po")
    with pytest.raises(SpdyProtocolError, match="after its"):
        unpack_header_block(pack_header_block({"a": "b"}) + b"junk")


def test_garbage_header_block_does_not_inflate():
    with pytest.raises(SpdyProtocolError, match="inflate"):
        HeaderDecompressor().decompress(b"\x00\x01\x02\x03")


def test_unknown_control_frames_are_skipped():
    noop = bytes.fromhex("80030005 00000000")  # SPDY/2's NOOP: draft 3 says ignore unknown types
    assert FrameParser().feed(noop + encode(Frame(PING, value=3))) == [Frame(PING, value=3)]
