"""pods/exec over a real local WebSocket server: a stream closed before the command's exit Status
is a cut (TunnelDropped, transient), never a short answer taken as the whole one; the env read
runs the command again when its stream was cut (the transitions e2e's failure on main)."""
from __future__ import annotations

import json

import pytest
from websockets.asyncio.server import serve

from tpenv.engine.appenv import read_app_env
from tpenv.errors import TunnelDropped
from tpenv.kits.podexec import ERROR, STDOUT, SUBPROTOCOL, exec_output

SUCCESS = json.dumps({"metadata": {}, "status": "Success"}).encode()


class LocalApi:
    """What exec_output needs of a Kube, pointed at a plain ws:// server on loopback."""

    tls_server_name = None

    def __init__(self, port: int) -> None:
        self.host = f"http://127.0.0.1:{port}"

    def auth_headers(self) -> dict[str, str]:
        return {}

    def ssl_context(self):
        return None


def exec_server(answers: list[list[bytes]]):
    """Each connection gets the next list of frames (channel byte first), then a clean close."""
    async def handler(ws):
        for frame in answers.pop(0):
            await ws.send(frame)
        await ws.close()

    return serve(handler, "127.0.0.1", 0, subprotocols=[SUBPROTOCOL])


def port_of(server) -> int:
    return next(iter(server.sockets)).getsockname()[1]


async def test_a_stream_closed_before_its_status_is_a_cut_not_an_answer():
    # Stage 1: half the output, then a clean close with no Status on the error channel.
    async with exec_server([[bytes([STDOUT]) + b"A=1\0B="]]) as server:
        with pytest.raises(TunnelDropped, match="before the command's exit status"):
            await exec_output(LocalApi(port_of(server)), "ns", "pod", "app", ["cat", "/proc/1/environ"])
    # Stage 2: the whole output and its Success Status: the answer.
    async with exec_server([[bytes([STDOUT]) + b"A=1\0B=2\0", bytes([ERROR]) + SUCCESS]]) as server:
        out = await exec_output(LocalApi(port_of(server)), "ns", "pod", "app", ["cat", "/proc/1/environ"])
    assert out == b"A=1\0B=2\0"


async def test_the_env_read_runs_again_after_a_cut_stream():
    answers = [[bytes([STDOUT]) + b"LANG=C."],  # cut mid-value: must not become LANG=C.
               [bytes([STDOUT]) + b"LANG=C.UTF-8\0JAVA_HOME=/opt/java\0", bytes([ERROR]) + SUCCESS]]
    async with exec_server(answers) as server:
        app = await read_app_env(LocalApi(port_of(server)), "ns", "pod", "app")
    assert app.why_not is None
    assert app.env == {"LANG": "C.UTF-8", "JAVA_HOME": "/opt/java"}
    assert answers == []  # exactly two execs: the cut one and the whole one
