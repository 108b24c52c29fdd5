"""bench/server.py sends a small answer in one write and, asked with ``&writes=2``, in two (issue 13:
the passthrough / HAProxy pair is measured both ways). The split is a pure function; the served
bytes are checked through a real server on loopback, both ways the same."""
from __future__ import annotations

import socket

from bench import server

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n"


def test_small_answer_is_one_write():
    [one] = server.answer_parts(HEAD, 1024)
    assert one == HEAD + server.BLOCK[:1024]


def test_two_writes_on_request():
    assert server.answer_parts(HEAD, 1024, two=True) == [HEAD, server.BLOCK[:1024]]


def test_larger_answers_keep_head_and_body_apart():
    # Joining would copy the body once more; the one-write rule is for small answers only.
    assert server.answer_parts(HEAD, server.SMALL + 1) == [HEAD, server.BLOCK[:server.SMALL + 1]]
    assert server.answer_parts(HEAD, len(server.BLOCK) + 1) == [HEAD]  # send_body writes the rest
    assert server.answer_parts(HEAD, 1024, head_only=True) == [HEAD]


def get(port: int, target: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target.encode())
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


def test_both_ways_serve_the_same_answer(served):
    # Stage 1: the default (one write) and the two-write answer, over a real socket.
    one, two = get(served, "/?size=1000"), get(served, "/?size=1000&writes=2")
    # Stage 2: same headers, same 1000-byte body.
    assert one == two
    head, _, body = one.partition(b"\r\n\r\n")
    assert b"Content-Length: 1000" in head and len(body) == 1000
