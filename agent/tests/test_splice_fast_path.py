"""The passthrough splice on each loop the sidecar can use: which read path carries the bytes,
and that flow control still bounds what the agent buffers when one side stops reading.

On uvloop a joined half's ``data_received`` is the peer transport's ``write`` itself (no Python
frame per chunk); on asyncio's loop the half reads into its own buffer (``buffer_updated``).
Stages: two halves joined over real socket pairs; bytes one way and the other; then a sender
that outruns a receiver that does not read, then reads everything.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from tpenv_agent import splice
from tpenv_agent.main import choose_loop, run_loop
from tpenv_agent.splice import Half, join

LOOPS = ["asyncio", "uvloop"]


def loop_factory(name: str):
    factory, got, why_not = choose_loop(name)
    assert got == name, why_not
    return factory


async def joined() -> tuple[Half, socket.socket, Half, socket.socket]:
    """caller socket <-> half a == half b <-> app socket, all real sockets on this loop."""
    loop = asyncio.get_running_loop()
    halves, ends = [], []
    for _ in range(2):
        ours, theirs = socket.socketpair()
        _, half = await loop.connect_accepted_socket(Half, ours)
        theirs.setblocking(False)
        halves.append(half)
        ends.append(theirs)
    join(halves[0], halves[1])
    return halves[0], ends[0], halves[1], ends[1]


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10)
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("loop", LOOPS)
def test_joined_halves_use_the_loops_cheapest_read_path_and_carry_bytes_both_ways(loop):
    async def body() -> None:
        a, caller, b, app = await joined()
        uv = "uvloop" in type(asyncio.get_running_loop()).__module__
        assert uv == (loop == "uvloop")
        if uv:  # the chunk goes from uvloop's read callback into the other transport's write
            assert a.data_received == b.transport.write and b.data_received == a.transport.write
        else:  # asyncio's loop: recv_into the half's buffer, no shortcut installed
            assert "data_received" not in vars(a) and "data_received" not in vars(b)
        caller.sendall(b"ping" * 1000)
        assert await recv_exactly(app, 4000) == b"ping" * 1000
        app.sendall(b"pong" * 1000)
        assert await recv_exactly(caller, 4000) == b"pong" * 1000
        caller.close()
        app.close()
        await asyncio.wait_for(asyncio.gather(a.closed, b.closed), 10)

    run_loop(body(), loop_factory(loop))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_receiver_that_does_not_read_pauses_the_sender_then_every_byte_arrives(loop):
    total = 64 * 1024 * 1024

    async def body() -> None:
        a, caller, b, app = await joined()
        for s in (caller, app):  # small kernel buffers: the agent's own buffering shows
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        block = os.urandom(1 << 20)
        want = hashlib.sha256(block * (total // len(block))).hexdigest()
        loop_ = asyncio.get_running_loop()
        sent = 0

        async def send() -> None:
            nonlocal sent
            for _ in range(total // len(block)):
                await loop_.sock_sendall(caller, block)
                sent += len(block)

        sender = asyncio.ensure_future(send())
        # The app does not read: the sender must stall with the agent holding at most about one
        # high-water mark plus a read's worth, not the whole transfer.
        peak = 0
        for _ in range(100):
            await asyncio.sleep(0.01)
            peak = max(peak, b.transport.get_write_buffer_size())
        assert not sender.done() and sent < total
        assert peak <= splice.HIGH_WATER + splice.READ_SIZE, peak
        # Now read everything: the sender resumes and every byte arrives in order.
        h = hashlib.sha256()
        got = 0
        while got < total:
            chunk = await asyncio.wait_for(loop_.sock_recv(app, 1 << 20), 10)
            assert chunk
            h.update(chunk)
            got += len(chunk)
        await asyncio.wait_for(sender, 10)
        assert h.hexdigest() == want
        caller.close()
        app.close()

    run_loop(body(), loop_factory(loop))
