"""Only certificates from the namespace CA get in; the client checks the agent's host key.

Stages: the sidecar with auth material A; clients presenting no certificate, a certificate
from another CA, a plain key, a principal that is not the user; and a client expecting
another host key.
"""
from __future__ import annotations

import asyncssh
import pytest

from agent_testkit import App, RawSession, auth_material, run_agent, session_cert

pytestmark = pytest.mark.timeout(60)


async def connect(agent, material, username, client_keys, host_key_pub=None):
    return await asyncssh.connect(
        "127.0.0.1", agent.ssh, username=username, client_keys=client_keys,
        known_hosts=([asyncssh.import_public_key(host_key_pub or material["host_key.pub"])], [], []),
        agent_path=None, config=[], password=None, preferred_auth="publickey,password,keyboard-interactive")


async def test_cert_from_the_namespace_ca_is_accepted(tmp_path):
    m = auth_material()
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            hello = await s.call("hello", session="s1", client="t")
            assert hello["ok"] and hello["container"] == "app" and hello["lease"] == 5


async def test_connection_without_a_certificate_is_refused(tmp_path):
    m = auth_material()
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        plain = asyncssh.generate_private_key("ssh-ed25519")
        with pytest.raises(asyncssh.PermissionDenied):
            await connect(agent, m, "s1", [plain])
        with pytest.raises(asyncssh.PermissionDenied):
            await connect(agent, m, "s1", [])


async def test_certificate_from_another_ca_is_refused(tmp_path):
    m, other = auth_material(), auth_material()
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        with pytest.raises(asyncssh.PermissionDenied):
            await connect(agent, m, "s1", [session_cert(other["ca_key"], "s1")])


async def test_username_must_equal_the_certificate_principal(tmp_path):
    m = auth_material()
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        with pytest.raises(asyncssh.PermissionDenied):
            await connect(agent, m, "mallory", [session_cert(m["ca_key"], "s1")])


async def test_client_refuses_an_agent_with_another_host_key(tmp_path):
    m, other = auth_material(), auth_material()
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        with pytest.raises(asyncssh.HostKeyNotVerifiable):
            await connect(agent, m, "s1", [session_cert(m["ca_key"], "s1")], host_key_pub=other["host_key.pub"])


async def test_only_control_and_sftp_subsystems_are_served(tmp_path):
    m = auth_material()
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"]) as agent:
        async with RawSession(agent, m, "s1") as s:
            result = await s.conn.run("id", check=False)
            assert result.exit_status != 0
            with pytest.raises(asyncssh.ChannelOpenError):
                await s.conn.open_connection("127.0.0.1", app.port)  # no direct-tcpip from the agent
