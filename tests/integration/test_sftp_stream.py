"""A mount's SFTP on a port-forward stream of its own (agent/tpenv_agent/sftp_stream.py, issue 13).

On 127.0.0.1 a "port-forward stream" is a plain TCP connection to the agent's stream port (in a
cluster it goes through the API server: tests/e2e/test_intercept_env_mount.py mounts that way).
Stages: a real sshfs mount over it, the SSH subsystem when the client asks for it; then the
attacks on the stream port's SFTP door.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent" / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_testkit import App, first_answer, run_agent  # noqa: E402
from local_sshfs import need_sshfs  # noqa: E402

from tpenv.engine.mounts import SshfsMount, is_mounted  # noqa: E402
from tpenv.kits.agent_client import AgentSession, make_auth_material  # noqa: E402

pytestmark = pytest.mark.timeout(90)

FXP_INIT, FXP_OPEN, FXP_VERSION, FXP_STATUS, FXP_HANDLE = 1, 3, 2, 101, 102


def session(material, agent, sid="s1", **kw) -> AgentSession:
    return AgentSession(sid, ca_key=material["ca_key"], host_key_pub=material["host_key.pub"],
                        port=agent.ssh, **kw)


def packet(kind: int, body: bytes) -> bytes:
    return (len(body) + 1).to_bytes(4, "big") + bytes([kind]) + body


def string(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


async def reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    length = int.from_bytes(await reader.readexactly(4), "big")
    body = await reader.readexactly(length)
    return body[0], body[1:]


async def sftp_open(writer, reader, rid: int, path: bytes) -> int:
    """One SSH_FXP_OPEN for reading; the answer's type (HANDLE: opened, STATUS: refused)."""
    writer.write(packet(FXP_OPEN, rid.to_bytes(4, "big") + string(path) + (1).to_bytes(4, "big")
                        + (0).to_bytes(4, "big")))
    kind, body = await asyncio.wait_for(reply(reader), 10)
    assert int.from_bytes(body[:4], "big") == rid
    return kind


async def test_sshfs_mounts_over_a_stream_of_its_own_and_over_ssh_when_asked(tmp_path):
    need_sshfs()
    m = make_auth_material()
    data = tmp_path / "mounts" / "var" / "data"
    data.mkdir(parents=True)
    blob = os.urandom(3 * 1024 * 1024 + 11)
    (data / "blob.bin").write_bytes(blob)
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"], extra=["--mount", "/var/data"]) \
            as agent:
        for own_stream in (True, False):
            async with session(m, agent, f"s-{own_stream}", sftp_stream=own_stream) as s:
                # Stage 1: the agent offers the stream; the mount's channel is the stream or SSH's,
                # as the session asked.
                assert "sftp-stream" in s.info["features"]
                served = agent.log_seen("serving SFTP on a stream of its own") if own_stream else None
                opened = []

                async def open_sftp():
                    pair = await s.open_sftp_channel()
                    opened.append(pair)
                    return pair

                local = tmp_path / f"vol-{own_stream}"
                mount = SshfsMount(open_sftp, local, name="data")
                # Stage 2: sshfs over it reads a file whole, writes one and lists the directory.
                async with mount:
                    assert is_mounted(local)
                    assert isinstance(opened[0][0], asyncio.StreamWriter) is own_stream
                    got = await asyncio.to_thread((local / "var" / "data" / "blob.bin").read_bytes)
                    assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
                    await asyncio.to_thread((local / "var" / "data" / f"from-laptop-{own_stream}").write_text, "hi\n")
                    names = await asyncio.to_thread(os.listdir, local / "var" / "data")
                    assert f"from-laptop-{own_stream}" in names and "blob.bin" in names
                    if served is not None:
                        await asyncio.wait_for(served, 10)
                assert not is_mounted(local)
                assert (data / f"from-laptop-{own_stream}").read_text() == "hi\n"


async def test_the_sftp_door_needs_the_token_stays_confined_and_dies_with_its_session(tmp_path):
    m = make_auth_material()
    cfg = tmp_path / "mounts" / "etc" / "cfg"
    cfg.mkdir(parents=True)
    (cfg / "app.conf").write_text("k=v\n")
    (tmp_path / "outside.txt").write_text("not served\n")
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"], extra=["--mount", "/etc/cfg"]) \
            as agent:
        async with session(m, agent) as s:
            port, token = s.info["streams"]["port"], s.info["streams"]["token"]

            # Stage 1: a wrong token, a right token with SFTP bytes in the same write: closed,
            # nothing sent (not even SFTP's VERSION to an INIT).
            wrong = bytes(a ^ 1 for a in bytes.fromhex(token)).hex()
            init = packet(FXP_INIT, (3).to_bytes(4, "big"))
            assert await first_answer(port, b"TPENV-SFTP 1 " + wrong.encode() + b"\n" + init) == b""
            assert await first_answer(port, b"TPENV-SFTP 1 " + token.encode() + b"\n" + init) == b""

            # Stage 2: the session's own stream serves the mounts and nothing outside them.
            writer, reader = await s.open_sftp_channel()
            assert isinstance(writer, asyncio.StreamWriter)
            writer.write(init)
            assert (await asyncio.wait_for(reply(reader), 10))[0] == FXP_VERSION
            assert await sftp_open(writer, reader, 1, b"/etc/cfg/app.conf") == FXP_HANDLE
            for rid, path in enumerate((b"/../../outside.txt", b"/etc/cfg/../../../../outside.txt",
                                        str(tmp_path / "outside.txt").encode(), b"/proc/self/environ"), 2):
                assert await sftp_open(writer, reader, rid, path) == FXP_STATUS, path

            # Stage 3: a session holds a few such streams, not an unbounded number.
            extra = [await s.open_sftp_channel() for _ in range(3)]  # 4 in all
            r5, w5 = await asyncio.open_connection("127.0.0.1", port)
            w5.write(b"TPENV-SFTP 1 " + token.encode() + b"\n")
            assert await asyncio.wait_for(r5.read(), 10) == b""
            w5.close()
            for w, _ in extra:
                w.close()

        # Stage 4: the session ended: its stream is closed by the agent, and its token opens no
        # other.
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert await first_answer(port, b"TPENV-SFTP 1 " + token.encode() + b"\n") == b""
