"""The splice keeps bytes (and an EOF) that arrive before its two halves are joined.

CPython before 3.11.4 (the agent image runs Debian bookworm's 3.11.2) re-adds a socket's
reader right after ``connection_made``, undoing the ``pause_reading()`` called there; the
caller's first bytes then reach a half with no peer yet. This was found in the cluster: every
all-TCP intercepted connection failed with "'NoneType' object has no attribute 'transport'".
The test drives the halves directly, so it fails without the hold on any Python version. It
runs on both loops the sidecar can use (tpenv_agent.main.choose_loop): asyncio's, where the
half reads through ``buffer_updated``, and uvloop, where it reads through ``data_received``.
"""
from __future__ import annotations

import asyncio
import socket

import pytest

from tpenv_agent.main import choose_loop, run_loop
from tpenv_agent.splice import Half, join

LOOPS = ["asyncio", "uvloop"]


async def connected_half() -> tuple[Half, socket.socket]:
    """A Half on one end of a real socket pair; the other end is the test's."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, half = await loop.connect_accepted_socket(Half, ours)
    theirs.setblocking(False)
    return half, theirs


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 10):
        out += chunk
    return bytes(out)


def loop_factory(name: str):
    factory, got, why_not = choose_loop(name)
    assert got == name, why_not  # uvloop is a test dependency (pyproject.toml)
    return factory


@pytest.mark.parametrize("loop", LOOPS)
def test_bytes_and_eof_before_join_reach_the_peer_after_it(loop):
    run_loop(bytes_and_eof_before_join(), loop_factory(loop))


async def bytes_and_eof_before_join() -> None:
    # -- stage 1: the caller's half receives data and EOF while it has no peer ----------------
    caller_half, caller = await connected_half()
    caller.sendall(b"GET / HTTP/1.1\r\n\r\n")
    caller.shutdown(socket.SHUT_WR)
    for _ in range(20):  # let the loop deliver whatever the transport reads (it must not raise)
        await asyncio.sleep(0)
    # Deliver the bytes as an early-reading transport would, whatever this Python does, by the
    # path this loop uses (uvloop: data_received; asyncio's: the buffer).
    if "uvloop" in type(asyncio.get_running_loop()).__module__:
        caller_half.data_received(b"EXTRA")
    else:
        view = caller_half.get_buffer(-1)
        view[:5] = b"EXTRA"
        caller_half.buffer_updated(5)

    # -- stage 2: join with the app's half: everything held is passed on, then the EOF --------
    app_half, app = await connected_half()
    join(caller_half, app_half)
    received = await read_all(app)
    # Held bytes first; the socket's own bytes come before them only where reading was not
    # really paused (old 3.11), after them where it was.
    assert received in (b"GET / HTTP/1.1\r\n\r\nEXTRA", b"EXTRAGET / HTTP/1.1\r\n\r\n")

    # -- stage 3: the other direction still works after the replayed EOF ---------------------
    app.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    app.shutdown(socket.SHUT_WR)
    assert await read_all(caller) == b"HTTP/1.1 200 OK\r\n\r\n"
    caller.close()
    app.close()
