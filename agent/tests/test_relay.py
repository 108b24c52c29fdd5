"""The manager's outbound relay (docs/protocol.md §7) as a real asyncssh server on 127.0.0.1 port 0.

Stages: login (certificate accepted; plain key, another CA, another principal refused);
direct-tcpip (an allowed address carries bytes both ways; refused destinations fail with the
relay's reason and no connection reaches them); the tpenv-resolve subsystem (ok, not-found,
bad requests, ping); what else is refused (tcpip-forward, shell, exec, other subsystems, too
many channels); the range policy and its discovery (pure); the manager process starting the
relay beside its webhook and logging how the relay ended.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import pytest
from asyncssh.constants import OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_CONNECT_FAILED, OPEN_RESOURCE_SHORTAGE

from agent_testkit import auth_material, session_cert, write_auth_dir
from tpenv_agent import relay as r
from tpenv_agent import relay_policy as rp
from tpenv_agent import relay_resolve as rr
from tpenv_agent.sshd import auth_from_material

AGENT_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK_ALLOWED = rp.Policy(rp.parse_cidrs(["127.0.0.0/8"]), explicit=True)


class TableResolver:
    """Names -> addresses, standing in for cluster DNS (the real one is the e2e test's)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, name: str):
        self.asked.append(name)
        if name not in self.table:
            raise rr.LookupNotFound(name)
        return self.table[name], None


class Echo:
    """A TCP server on 127.0.0.1 port 0 echoing with a prefix; counts the connections it got."""

    def __init__(self) -> None:
        self.accepted = 0

    async def __aenter__(self) -> "Echo":
        async def serve(reader, writer):
            self.accepted += 1
            while data := await reader.read(65536):
                writer.write(b"echo:" + data)
                await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def relay_server(material, policy=LOOPBACK_ALLOWED, resolver=None, **kw):
    host_key, authorized = auth_from_material(material["ca.pub"], material["host_key"])
    relay = r.Relay(host_key, authorized, rp.StaticPolicy(policy),
                    resolver=resolver or TableResolver({}), **kw)
    async with relay:
        port = await relay.start("127.0.0.1", 0)
        yield relay, port


def connect(port, material, user="sess1", key=None, ca_key=None, principal=None):
    if key is None:
        key = session_cert(ca_key or material["ca_key"], principal or user)
    return asyncssh.connect("127.0.0.1", port, username=user, client_keys=[key],
                            known_hosts=([asyncssh.import_public_key(material["host_key.pub"])], [], []),
                            agent_path=None, config=[], preferred_auth="publickey")


class Resolve:
    """A tpenv-resolve channel: call(op, **fields) -> answer."""

    def __init__(self, conn) -> None:
        self.conn, self.ids = conn, 0

    async def __aenter__(self) -> "Resolve":
        self.stdin, self.stdout, _ = await self.conn.open_session(subsystem=rr.SUBSYSTEM, encoding=None)
        return self

    async def __aexit__(self, *exc) -> None:
        self.stdin.close()

    async def call(self, op: str, **fields) -> dict:
        self.ids += 1
        self.stdin.write(json.dumps({"id": self.ids, "op": op, **fields}).encode() + b"\n")
        answer = json.loads(await asyncio.wait_for(self.stdout.readline(), 10))
        assert answer["id"] == self.ids
        return answer


@pytest.fixture
def material():
    return auth_material()


# --- stage 1: login as protocol §2 says --------------------------------------------------------------

async def test_a_session_certificate_logs_in(material):
    async with relay_server(material) as (_, port):
        async with connect(port, material) as conn, Resolve(conn) as res:
            answer = await res.call("ping")
            assert answer["ok"] is True and abs(answer["time"] - time.time()) < 60


async def test_info_reports_ranges_domain_and_nameservers(material):
    async with relay_server(material, domain="corp.internal", nameservers=["10.96.0.10"]) as (_, port):
        async with connect(port, material) as conn, Resolve(conn) as res:
            answer = await res.call("info")
            assert answer["ok"] is True
            assert answer["ranges"] == [str(n) for n in LOOPBACK_ALLOWED.ranges]
            assert answer["domain"] == "corp.internal" and answer["nameservers"] == ["10.96.0.10"]


@pytest.mark.parametrize("how", ["plain key", "another CA", "another principal"])
async def test_anything_but_a_certificate_of_the_ca_for_this_user_is_refused(material, how):
    other = auth_material()
    kw = {"plain key": {"key": asyncssh.generate_private_key("ssh-ed25519")},
          "another CA": {"ca_key": other["ca_key"]},
          "another principal": {"principal": "someone-else"}}[how]
    async with relay_server(material) as (_, port):
        with pytest.raises(asyncssh.PermissionDenied):
            async with connect(port, material, **kw):
                pass


# --- stage 2: direct-tcpip ----------------------------------------------------------------------------

async def test_an_allowed_address_carries_bytes_both_ways(material):
    async with Echo() as echo, relay_server(material) as (_, port):
        async with connect(port, material) as conn:
            reader, writer = await conn.open_connection("127.0.0.1", echo.port)
            writer.write(b"hello")
            assert await reader.readexactly(10) == b"echo:hello"
            big = os.urandom(300_000)
            writer.write(big)
            writer.write_eof()
            got = b""
            while chunk := await reader.read(65536):
                got += chunk
            assert got.replace(b"echo:", b"") == big
            writer.close()


async def test_a_name_is_resolved_by_the_relay_and_dialled(material):
    resolver = TableResolver({"hello.ns": ["127.0.0.1"]})
    async with Echo() as echo, relay_server(material, resolver=resolver) as (_, port):
        async with connect(port, material) as conn:
            reader, writer = await conn.open_connection("hello.ns", echo.port)
            writer.write(b"x")
            assert await reader.readexactly(6) == b"echo:x"
            writer.close()
    assert resolver.asked == ["hello.ns"]


async def test_refused_destinations_fail_with_the_relays_reason_and_are_never_dialled(material):
    # A discovered policy whose range even contains loopback: the manager's own loopback stays refused.
    policy = rp.Policy(rp.parse_cidrs(["127.0.0.0/8", "10.96.0.0/16"]),
                      own=frozenset({ipaddress.ip_address("10.96.0.7")}))
    resolver = TableResolver({"outside.example": ["8.8.8.8"], "mixed.ns": ["127.0.0.1", "8.8.4.4"]})
    async with Echo() as echo, relay_server(material, policy=policy, resolver=resolver) as (_, port):
        async with connect(port, material) as conn:
            cases = {("127.0.0.1", echo.port): "loopback", ("8.8.8.8", 53): "outside the cluster",
                     ("169.254.169.254", 80): "link-local", ("10.96.0.7", 80): "manager pod itself",
                     ("outside.example", 443): "outside the cluster", ("mixed.ns", echo.port): "loopback",
                     ("nowhere.ns", 80): "no such name", ("10.96.0.9", 0): "bad port"}
            for (host, p), why in cases.items():
                with pytest.raises(asyncssh.ChannelOpenError) as e:
                    await conn.open_connection(host, p)
                assert e.value.reason.startswith("relay: ") and why in e.value.reason, (host, e.value.reason)
            with pytest.raises(asyncssh.ChannelOpenError) as e:
                await conn.open_connection("8.8.8.8", 53)
            assert e.value.code == OPEN_ADMINISTRATIVELY_PROHIBITED
    assert echo.accepted == 0


async def test_a_closed_port_is_a_connect_failure_not_a_refusal(material):
    async with Echo() as echo:
        closed = echo.port  # nothing listens there once the server is gone
    async with relay_server(material) as (_, port):
        async with connect(port, material) as conn:
            with pytest.raises(asyncssh.ChannelOpenError) as e:
                await conn.open_connection("127.0.0.1", closed)
            assert e.value.code == OPEN_CONNECT_FAILED and f"127.0.0.1:{closed}" in e.value.reason


# --- stage 3: tpenv-resolve ----------------------------------------------------------------------------

async def test_resolve_tries_the_namespaced_service_name_first(material):
    resolver = TableResolver({"hello.ns.svc.cluster.local.": ["10.96.3.4"], "web": ["10.96.0.10"],
                              "db.other": ["10.244.0.9", "fd00::9"]})
    async with relay_server(material, resolver=resolver) as (_, port):
        async with connect(port, material) as conn, Resolve(conn) as res:
            answer = await res.call("resolve", name="hello", namespace="ns")
            assert answer == {"id": 1, "ok": True, "name": "hello.ns.svc.cluster.local",
                              "addresses": ["10.96.3.4"], "cname": None}
            # Not a service of that namespace: the bare name, through the pod's search list.
            answer = await res.call("resolve", name="web", namespace="ns")
            assert answer["ok"] and answer["addresses"] == ["10.96.0.10"] and answer["name"] == "web"
            assert resolver.asked[-2:] == ["web.ns.svc.cluster.local.", "web"]
            # A dotted name is asked as it is.
            answer = await res.call("resolve", name="db.other", namespace="ns")
            assert answer["addresses"] == ["10.244.0.9", "fd00::9"] and resolver.asked[-1] == "db.other"


async def test_resolve_not_found_and_bad_requests(material):
    async with relay_server(material, resolver=TableResolver({})) as (_, port):
        async with connect(port, material) as conn, Resolve(conn) as res:
            answer = await res.call("resolve", name="nothing", namespace="ns")
            assert answer["ok"] is False and answer["error"]["code"] == "not-found"
            assert "nothing" in answer["error"]["message"]
            for fields in ({"name": ""}, {"name": 5}, {"name": "x" * 300}, {"name": "a", "namespace": 3}):
                answer = await res.call("resolve", **fields)
                assert answer["error"]["code"] == "bad-request", fields
            answer = await res.call("shell")
            assert answer["error"]["code"] == "bad-request" and "unknown op" in answer["error"]["message"]
            res.stdin.write(b"not json\n")
            assert json.loads(await res.stdout.readline())["error"]["code"] == "bad-request"
            assert (await res.call("ping"))["ok"]  # the channel survives bad requests


async def test_a_known_nxdomain_wins_over_a_fallback_that_could_not_be_asked(material):
    class Refusing(TableResolver):  # like a cluster DNS without forwarding, through glibc
        async def __call__(self, name):
            self.asked.append(name)
            if name.endswith("."):
                raise rr.LookupNotFound(name)
            raise rr.LookupFailed(f"lookup of {name} failed: Temporary failure in name resolution")

    async with relay_server(material, resolver=Refusing({})) as (_, port):
        async with connect(port, material) as conn, Resolve(conn) as res:
            answer = await res.call("resolve", name="nothing", namespace="ns")
            assert answer["error"]["code"] == "not-found"
            answer = await res.call("resolve", name="nothing.ns")  # nothing known: temporary
            assert answer["error"]["code"] == "internal" and "Temporary failure" in answer["error"]["message"]


async def test_many_lookups_on_one_channel_are_all_answered(material):
    class Slow(TableResolver):
        async def __call__(self, name):
            await asyncio.sleep(0.01)
            return await super().__call__(name)

    table = {f"n{i}": [f"10.96.0.{i}"] for i in range(60)}
    async with relay_server(material, resolver=Slow(table)) as (_, port):
        async with connect(port, material) as conn, Resolve(conn) as res:
            for i in range(60):  # more than MAX_IN_FLIGHT at once: reading pauses, nothing is lost
                res.stdin.write(json.dumps({"id": i, "op": "resolve", "name": f"n{i}"}).encode() + b"\n")
            answers = [json.loads(await asyncio.wait_for(res.stdout.readline(), 10)) for _ in range(60)]
            assert sorted(a["id"] for a in answers) == list(range(60))
            assert all(a["addresses"] == [f"10.96.0.{a['id']}"] for a in answers)


async def test_the_system_resolver_reads_the_pods_resolver():
    resolver = rr.SystemResolver(timeout=5)
    try:
        addresses, _ = await resolver("localhost")  # /etc/hosts: no packet leaves the machine
        assert "127.0.0.1" in addresses or "::1" in addresses
    finally:
        resolver.close()


# --- stage 4: everything else is refused ----------------------------------------------------------------

async def test_forwards_shells_exec_and_other_subsystems_are_refused(material):
    async with relay_server(material) as (_, port):
        async with connect(port, material) as conn:
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("", 0, "127.0.0.1", 9)
            for kw in ({}, {"command": "id"}, {"subsystem": "sftp"}, {"subsystem": "tpenv-control"}):
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_session(**kw)
            async with Resolve(conn) as res:  # the connection is still good
                assert (await res.call("ping"))["ok"]


async def test_channels_per_connection_are_capped(material):
    async with Echo() as echo, relay_server(material, max_channels=2) as (relay, port):
        async with connect(port, material) as conn:
            first = await conn.open_connection("127.0.0.1", echo.port)
            async with Resolve(conn):
                with pytest.raises(asyncssh.ChannelOpenError) as e:
                    await conn.open_connection("127.0.0.1", echo.port)
                assert e.value.code == OPEN_RESOURCE_SHORTAGE and "too many channels" in e.value.reason
            first[1].close()
            await first[1].channel.wait_closed()
            # Closed channels give their place back.
            reader, writer = await conn.open_connection("127.0.0.1", echo.port)
            writer.write(b"again")
            assert await reader.readexactly(10) == b"echo:again"
            writer.close()


# --- stage 5: the range policy and its discovery (pure) -------------------------------------------------

def test_discovered_ranges_never_admit_loopback_link_local_own_or_node_addresses():
    ip = ipaddress.ip_address
    p = rp.Policy(rp.parse_cidrs(["10.244.0.0/16", "10.96.0.0/16", "127.0.0.0/8", "fe80::/10"]),
                 own=frozenset({ip("10.244.0.5")}), nodes=frozenset({ip("10.244.0.1")}))
    assert p.refusal(ip("10.244.3.7")) is None and p.refusal(ip("10.96.0.10")) is None
    assert "loopback" in p.refusal(ip("127.0.0.1"))
    assert "link-local" in p.refusal(ip("fe80::1"))
    assert "manager pod itself" in p.refusal(ip("10.244.0.5"))
    assert "node" in p.refusal(ip("10.244.0.1"))
    assert "outside" in p.refusal(ip("192.168.1.1")) and "10.244.0.0/16" in p.refusal(ip("192.168.1.1"))
    # Given ranges are literal: that is how a local test (and only it) allows loopback.
    assert LOOPBACK_ALLOWED.refusal(ip("127.0.0.1")) is None
    with pytest.raises(ValueError, match="bad CIDR 'ten'"):
        rp.parse_cidrs(["ten"])


ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100F40A\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0000F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t0000100A\t0100F40A\t0003\t0\t0\t0\t0000FFFF\t0\t0\t0
"""


def test_the_pods_onlink_subnet_is_read_from_the_route_table():
    assert rp.onlink_ipv4_subnets(ROUTES) == (ipaddress.ip_network("10.244.0.0/24"),)


async def test_api_discovery_uses_service_cidrs_node_pod_cidrs_and_falls_back_to_the_route_table(tmp_path):
    routes = tmp_path / "route"
    routes.write_text(ROUTES)
    nodes = {"items": [{"spec": {}, "status": {"addresses": [{"type": "InternalIP", "address": "10.244.0.1"},
                                                              {"type": "Hostname", "address": "n1"}]}}]}
    answers = {"/apis/networking.k8s.io/v1/servicecidrs": {"items": [{"spec": {"cidrs": ["10.96.0.0/16"]}}]},
               "/api/v1/nodes": nodes}
    calls = []

    async def api_get(path):
        calls.append(path)
        return answers[path]

    source = rp.ApiPolicy(api_get, own=[ipaddress.ip_address("10.244.0.9")], route_file=str(routes), refresh_every=3600)
    p = await source.current()
    assert [str(n) for n in p.ranges] == ["10.96.0.0/16", "10.244.0.0/24"]
    assert "node" in p.refusal(ipaddress.ip_address("10.244.0.1"))
    assert "itself" in p.refusal(ipaddress.ip_address("10.244.0.9"))
    # Nodes that carry podCIDRs win over the route table; a refresh is rate-limited.
    nodes["items"][0]["spec"]["podCIDRs"] = ["10.244.0.0/24", "10.245.0.0/24"]
    assert await source.current(refresh=True) is p and len(calls) == 2
    fresh = rp.ApiPolicy(api_get, route_file=str(routes), refresh_every=0)
    assert [str(n) for n in (await fresh.current()).ranges] == ["10.96.0.0/16", "10.244.0.0/24", "10.245.0.0/24"]
    # ServiceCIDRs not readable: the pod ranges still work.
    answers["/apis/networking.k8s.io/v1/servicecidrs"] = None
    assert [str(n) for n in (await fresh.current(refresh=True)).ranges] == ["10.244.0.0/24", "10.245.0.0/24"]


def test_the_cluster_domain_comes_from_the_search_list(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 10.96.0.10\nsearch tpenv.svc.corp.internal svc.corp.internal corp.internal\n"
                    "options ndots:5\n")
    assert rr.cluster_domain(str(conf)) == "corp.internal"
    assert rr.cluster_domain(str(tmp_path / "missing")) == "cluster.local"
    assert rr.candidates("hello", "ns", "corp.internal") == ["hello.ns.svc.corp.internal.", "hello"]
    assert rr.candidates("hello.ns", "ns", "cluster.local") == ["hello.ns"]


# --- stage 6: the manager process starts the relay beside the webhook --------------------------------------

async def test_the_manager_process_serves_the_relay_and_logs_how_it_ended(tmp_path, material):
    from test_webhook_server import _cert

    tls = _cert(tmp_path)
    auth = write_auth_dir(tmp_path / "auth", material)
    relay_port_file = tmp_path / "relay-port"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tpenv_agent.manager", "--tls-dir", str(tls), "--listen", "127.0.0.1:0",
        "--relay", "127.0.0.1:0", "--relay-auth-dir", str(auth), "--relay-cidr", "127.0.0.0/8",
        "--relay-port-file", str(relay_port_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(AGENT_ROOT)})
    try:
        lines = []
        while not any(line.startswith("relay listening on ssh://127.0.0.1:") for line in lines):
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, (await proc.stderr.read()).decode()
            lines.append(line)
        port = int(relay_port_file.read_text())
        async with Echo() as echo, connect(port, material) as conn:
            reader, writer = await conn.open_connection("127.0.0.1", echo.port)
            writer.write(b"via manager")
            assert await reader.readexactly(16) == b"echo:via manager"
            writer.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    log = err.decode()
    assert "[relay/sess1] session connected" in log and "[relay/server] task ended: stopped" in log
    assert "PRIVATE KEY" not in log and material["ca.pub"].decode().split()[1] not in log


def test_without_a_cluster_or_auth_dir_the_relay_is_off_and_the_webhook_serves(tmp_path):
    from test_webhook_server import _cert

    proc = subprocess.Popen([sys.executable, "-m", "tpenv_agent.manager", "--tls-dir", str(_cert(tmp_path)),
                             "--listen", "127.0.0.1:0"], env={**os.environ, "PYTHONPATH": str(AGENT_ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("listening on https://127.0.0.1:")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert "[relay/server] off: not in a cluster and no --relay-auth-dir" in err
    assert "[relay/server] task ended: off" in err
