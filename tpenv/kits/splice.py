"""Copy bytes both ways between two stream pairs: a forward's accepted socket and its
port-forward stream, a captured connection and its relay channel, a proxy client and its target.

Works with asyncio streams and asyncssh's SSHReader/SSHWriter alike (``read``, ``write``,
``drain``, ``can_write_eof``/``write_eof``, ``close``). Each direction ends on EOF and passes the
half-close on, so request/response protocols that shut down their write side (HTTP/1.0, rsync,
``nc -N``) see the other direction finish.
"""
from __future__ import annotations

import asyncio
from typing import Any

import asyncssh

from tpenv.errors import TpenvError

CHUNK = 256 * 1024


async def pipe(src: Any, dst: Any, chunk: int = CHUNK) -> int:
    """Copy ``src`` to ``dst`` until EOF, then half-close ``dst``. Returns the bytes copied; a
    broken side ends the copy quietly (the caller closes both)."""
    total = 0
    try:
        while data := await src.read(chunk):
            dst.write(data)
            total += len(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (OSError, TpenvError, asyncssh.Error):  # a reset, a dropped tunnel, a closed SSH channel
        pass
    return total


async def splice(a_r: Any, a_w: Any, b_r: Any, b_w: Any, chunk: int = CHUNK) -> tuple[int, int]:
    """Copy both ways until both directions end (or one side breaks), then close both.
    Returns (bytes a->b, bytes b->a)."""
    try:
        sent, received = await asyncio.gather(pipe(a_r, b_w, chunk), pipe(b_r, a_w, chunk))
        return sent, received
    finally:
        b_w.close()
        a_w.close()


__all__ = ["pipe", "splice", "CHUNK"]
