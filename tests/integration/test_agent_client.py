"""tpenv's AgentSession against the real sidecar process, over real SSH on 127.0.0.1.

Stages: auth material from make_auth_material(), an app and a developer's handler, the
sidecar as a process; then the session's operations and how its errors map to tpenv.errors.
"""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import asyncssh
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent" / "tests"))
from agent_testkit import App, H2Caller, get_once, run_agent  # noqa: E402

from tpenv.errors import Conflict, Forbidden, NotFound, PermanentError, TunnelDropped  # noqa: E402
from tpenv.kits.agent_client import AgentSession, issue_session_key, make_auth_material  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def session(material, agent, sid="s1", **kw) -> AgentSession:
    return AgentSession(sid, ca_key=material["ca_key"], host_key_pub=material["host_key.pub"],
                        port=agent.ssh, **kw)


def test_auth_material_has_the_four_secret_keys_and_certs_name_the_session():
    m = make_auth_material()
    assert set(m) == {"ca_key", "ca.pub", "host_key", "host_key.pub"}
    assert all(isinstance(v, bytes) for v in m.values())
    assert m["ca.pub"].startswith(b"ssh-ed25519 ") and b"PRIVATE KEY" in m["ca_key"]
    key, cert = issue_session_key(m["ca_key"], "sess-42")
    assert cert.principals == ["sess-42"] and cert._key_id == "sess-42"
    assert cert._valid_before - cert._valid_after >= 12 * 3600
    assert cert.signing_key.public_data == asyncssh.import_public_key(m["ca.pub"]).public_data


async def test_session_hello_intercept_list_leave_and_close_twice(tmp_path):
    m = make_auth_material()
    (tmp_path / "image-env.json").write_text(json.dumps(["IMAGE_VAR"]))
    async with App("app") as app, App("dev") as dev, \
            run_agent(tmp_path, m, [f"0:{app.port}:http"], env={"APP_X": "1", "IMAGE_VAR": "2"}) as agent:
        s = session(m, agent)
        async with s:
            assert s.info["ports"] == [{"name": "http", "agent_port": agent.port("http"), "app_port": app.port}]
            icpt = await s.intercept("web", "http", {"headers": {"x-telepresence-intercept-id": "s1:web"}},
                                     local_port=dev.port)
            assert icpt["intercept_id"] == "s1:web" and icpt["session"] == "s1"
            port = agent.port("http")
            assert (await get_once(port, headers={"x-telepresence-intercept-id": "s1:web"}))["who"] == "dev"
            assert (await get_once(port))["who"] == "app"
            # Re-intercepting under the same name replaces the rule (and its forward).
            await s.intercept("web", app.port, None, local_port=dev.port)  # by app port number
            assert [i["match"] for i in await s.list()] == [None]
            assert (await get_once(port))["who"] == "dev"
            await s.leave("web")
            assert await s.list() == []
            assert (await get_once(port))["who"] == "app"
            env = await s.env()
            assert env["APP_X"] == "1" and "IMAGE_VAR" not in env
            assert (await s.mounts())["mounts"] == []
            with pytest.raises(NotFound):
                await s.leave("web")
        assert s.closed.is_set()
        s.close()
        await s.wait_closed()
        with pytest.raises(TunnelDropped):
            await s.list()


async def test_grpc_streams_of_one_connection_split_between_app_and_session(tmp_path):
    m = make_auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:grpc"]) as agent:
        async with session(m, agent, "alice") as s, H2Caller(agent.port("grpc")) as caller:
            await s.intercept("api", "grpc", {"headers": {"x-telepresence-intercept-id": "alice:api"}}, dev.port)
            mine = {"x-telepresence-intercept-id": "alice:api"}
            assert (await caller.request("/pkg.Svc/Get", mine, grpc=True))["json"]["who"] == "dev"
            assert (await caller.request("/pkg.Svc/Get", None, grpc=True))["json"]["who"] == "app"


async def test_second_all_tcp_session_gets_conflict_naming_the_holder(tmp_path):
    m = make_auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with session(m, agent, "alice") as a, session(m, agent, "bob") as b:
            await a.intercept("web", "http", None, dev.port)
            with pytest.raises(Conflict, match="alice:web"):
                await b.intercept("web", "http", None, dev.port)


async def test_wrong_host_key_and_foreign_ca_are_refused_with_clear_errors(tmp_path):
    m, other = make_auth_material(), make_auth_material()
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        impostor = AgentSession("s1", ca_key=m["ca_key"], host_key_pub=other["host_key.pub"], port=agent.ssh)
        with pytest.raises(PermanentError, match="host key"):
            await impostor.connect()
        stranger = AgentSession("s1", ca_key=other["ca_key"], host_key_pub=m["host_key.pub"], port=agent.ssh)
        with pytest.raises(Forbidden):
            await stranger.connect()


async def test_sftp_channel_and_client_reach_the_mounts(tmp_path):
    m = make_auth_material()
    (tmp_path / "mounts" / "etc" / "cfg").mkdir(parents=True)
    (tmp_path / "mounts" / "etc" / "cfg" / "app.conf").write_text("k=v\n")
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"], extra=["--mount", "/etc/cfg"]) as agent:
        async with session(m, agent) as s:
            assert (await s.mounts())["mounts"] == ["/etc/cfg"]
            async with await s.sftp() as sftp:
                async with sftp.open("/etc/cfg/app.conf") as f:
                    assert await f.read() == "k=v\n"
            # The raw channel speaks SFTP: an SSH_FXP_INIT gets an SSH_FXP_VERSION back.
            stdin, stdout = await s.open_sftp_channel()
            stdin.write(b"\x00\x00\x00\x05\x01\x00\x00\x00\x03")
            length = int.from_bytes(await stdout.readexactly(4), "big")
            assert (await stdout.readexactly(length))[0] == 2
            stdin.close()


async def test_session_closed_event_fires_when_the_agent_goes_away(tmp_path):
    m = make_auth_material()
    async with App("app") as app:
        async with run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
            s = session(m, agent)
            await s.connect()
            agent.proc.kill()
            await s.closed.wait()
            with pytest.raises(TunnelDropped):
                await s.list()
            s.close()
            await s.wait_closed()


class LoopbackTunnel:
    """The documented hook, as the port-forward transport implements it, over plain TCP."""

    def __init__(self, real_port: int) -> None:
        self.real_port = real_port
        self.asked: list[tuple[str, int]] = []

    async def create_connection(self, session_factory, host, port):
        self.asked.append((host, port))
        import asyncio
        return await asyncio.get_running_loop().create_connection(session_factory, "127.0.0.1", self.real_port)


async def test_session_runs_over_a_pluggable_tunnel(tmp_path):
    m = make_auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        tunnel = LoopbackTunnel(agent.ssh)
        async with AgentSession("t1", ca_key=m["ca_key"], host_key_pub=m["host_key.pub"],
                                host="pod/web-0", port=7922, tunnel=tunnel) as s:
            await s.intercept("web", "http", None, dev.port)
            assert (await get_once(agent.port("http")))["who"] == "dev"
        assert tunnel.asked == [("pod/web-0", 7922)]


async def test_leave_with_drain_lets_requests_already_sent_finish_before_the_session_closes(tmp_path):
    # Issue #11 "zero loss": a matched request in flight on the laptop when the intercept ends must
    # get its answer from the laptop. Leaving used to close the SSH session at once, cutting it.
    m = make_auth_material()
    async with App("app") as app, App("dev") as dev, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        port = agent.port("http")
        mine = {"x-telepresence-intercept-id": "s1:web"}

        # Stage 1: a request reaches the laptop's handler and waits there (dev.gate).
        s = session(m, agent)
        await s.connect()
        await s.intercept("web", "http", {"headers": dict(mine)}, local_port=dev.port)
        pending = asyncio.ensure_future(get_once(port, "/slow", headers=mine))
        await asyncio.wait_for(dev.arrived.wait(), 20)

        # Stage 2: leave with a drain: the agent sends new requests to the app at once...
        leaving = asyncio.ensure_future(s.leave("web", drain=20))
        await asyncio.sleep(0)  # the leave's line goes out first; the agent answers in order
        assert await s.list() == []
        assert (await get_once(port, headers=mine))["who"] == "app"
        assert not leaving.done()  # ... while the request in flight holds the drain

        # Stage 3: the handler answers; the request ends on the laptop, then the leave returns.
        dev.gate.set()
        assert (await asyncio.wait_for(pending, 20))["who"] == "dev"
        await asyncio.wait_for(leaving, 20)
        s.close()
        await s.wait_closed()


async def test_the_data_path_negotiates_aes_gcm_and_moves_megabytes_intact_both_ways(tmp_path):
    """Issue 13: the tunnel's cipher is AES-GCM, channels use 128 KiB packets and a bounded
    window (tpenv_agent.sshtuning), and bulk in both directions arrives byte for byte."""
    import hashlib
    import os

    from tpenv_agent.sshtuning import CIPHERS

    # Stage 1: a handler that hashes what it is sent and answers with its own bulk.
    answer = os.urandom(6 * 1024 * 1024 + 17)

    async def handler(reader, writer):
        h = hashlib.sha256()
        while chunk := await reader.read(1 << 16):
            h.update(chunk)
        writer.write(h.digest() + answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    dev_port = server.sockets[0].getsockname()[1]
    m = make_auth_material()
    async with server, App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:tcp"]) as agent:
        async with session(m, agent) as s:
            # Stage 2: the negotiated cipher is the first of ours (the agent runs our server).
            assert s.cipher == CIPHERS[0] == "aes128-gcm@openssh.com"
            await s.intercept("bulk", "tcp", None, dev_port)
            # Stage 3: 9 MiB up through an all-TCP intercept, 6 MiB down; both hashed.
            sent = os.urandom(9 * 1024 * 1024 + 5)
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.port("tcp"))
            writer.write(sent)
            await writer.drain()
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            assert got[:32] == hashlib.sha256(sent).digest()
            assert len(got) - 32 == len(answer) and got[32:] == answer
