"""JsonChannelSession against a real asyncssh server on 127.0.0.1:0 (generated keys).

The server's subsystem answers every request except ``slow`` ones, which it never answers.
Checked: answers are routed by id, a request that times out leaves the session usable, and
the server closing the channel fails what is pending with TunnelDropped.
"""
from __future__ import annotations

import asyncio
import json
import logging

import asyncssh
import pytest

from tpenv.errors import TunnelDropped
from tpenv.kits.sshjson import JsonChannelSession

pytestmark = pytest.mark.timeout(30)


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # test only: no authentication on a loopback port of this test


async def _subsystem(process: asyncssh.SSHServerProcess) -> None:
    async for line in process.stdin:
        req = json.loads(line)
        if req["op"] == "bye":
            break
        if req["op"] != "slow":
            process.stdout.write(json.dumps({"id": req["id"], "ok": True, "op": req["op"]}).encode() + b"\n")
    process.exit(0)


class Client(JsonChannelSession):
    def __init__(self, port: int) -> None:
        super().__init__(logging.getLogger("test.sshjson"), what="test session", eof_why="channel ended")
        self.port = port

    async def connect(self) -> "Client":
        self._conn = await asyncssh.connect("127.0.0.1", self.port, known_hosts=None, username="t",
                                            client_keys=None, agent_path=None)
        await self._open_channel("test", "refused")
        return self


@pytest.fixture
async def server():
    key = asyncssh.generate_private_key("ssh-ed25519")
    srv = await asyncssh.create_server(_Server, "127.0.0.1", 0, server_host_keys=[key], encoding=None,
                                       process_factory=_subsystem, allow_scp=False)
    yield srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()


async def test_answers_by_id_and_a_timeout_keeps_the_session(server):
    async with Client(server) as c:
        # Stage 1: two requests in flight get their own answers.
        a, b = await asyncio.gather(c._exchange("one", {}), c._exchange("two", {}))
        assert (a["op"], b["op"]) == ("one", "two") and a["id"] != b["id"]
        # Stage 2: an unanswered request times out, and the session still works after it.
        with pytest.raises(asyncio.TimeoutError):
            await c._exchange("slow", {}, timeout=0.2)
        assert not c.closed.is_set()
        assert (await c._exchange("three", {}, timeout=5))["op"] == "three"
        assert c._pending == {}


async def test_the_server_ending_the_channel_fails_what_is_pending(server):
    async with Client(server) as c:
        waiting = asyncio.ensure_future(c._exchange("slow", {}))
        await asyncio.sleep(0.1)
        with pytest.raises(TunnelDropped):
            await c._exchange("bye", {})  # the server closes the channel instead of answering
        with pytest.raises(TunnelDropped):
            await waiting
        assert c.closed.is_set()
        with pytest.raises(TunnelDropped, match="is closed"):
            await c._exchange("one", {})
