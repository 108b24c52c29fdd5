"""The client's side of the route probe (tpenv/kits/routeprobe.py, tpenv/engine/routeready.py):
the "every probe seen?" decision, the rounds and their bound, probe counts, probers per node."""
from __future__ import annotations

import pytest

from tpenv.engine.routeready import probe_count, probers_by_node
from tpenv.errors import TunnelDropped
from tpenv.kits.aio import Backoff
from tpenv.kits.routeprobe import judge, prove_routed


def dialed(*ports: int, ip: str = "10.0.0.5") -> list[dict]:
    return [{"local": [ip, p], "ok": True} for p in ports]


def test_every_probe_seen_by_address_or_counted_when_snatted():
    probes = dialed(4001, 4002, 4003)
    assert judge(probes, [["10.0.0.5", 4001], ["10.0.0.5", 4002], ["10.0.0.5", 4003]]) is None
    # Hairpin: the prober reached itself through its Service, SNATed to the node with a new port.
    assert judge(probes, [["10.0.0.5", 4001], ["10.0.0.1", 61000], ["10.0.0.1", 52000]]) is None
    why = judge(probes, [["10.0.0.5", 4001], ["10.0.0.1", 61000]])
    assert why is not None and why.startswith("1 of 3 probes reached no agent")
    # A probe seen twice (by address) does not stand in for a missing one.
    assert judge(probes, [["10.0.0.5", 4001], ["10.0.0.5", 4001], ["10.0.0.5", 4002]]) is not None
    assert judge(probes, []).startswith("3 of 3")


def test_a_failed_probe_fails_the_round_whatever_was_seen():
    probes = dialed(4001, 4002) + [{"local": ["10.0.0.5", 4003], "ok": False, "error": "Connection refused"}]
    why = judge(probes, [["10.0.0.5", 4001], ["10.0.0.5", 4002], ["10.0.0.1", 999]])
    assert why is not None and "1 of 3 probes failed (Connection refused)" in why
    assert judge([], []) == "the prober sent no probe"


def test_probe_count_and_one_prober_per_node():
    assert probe_count(1) == 16 and probe_count(3) == 32 and probe_count(7) == probe_count(100) == 64
    pods = {"b": {"spec": {"nodeName": "n1"}}, "a": {"spec": {"nodeName": "n1"}},
            "c": {"spec": {"nodeName": "n2"}}, "d": {}}
    assert probers_by_node(pods) == ["a", "c", "d"]  # a pod of unknown node probes for itself


class FakeAgent:
    """An agent's probe ops over a scripted routing: ``route`` says, per dial, where each probe
    lands: an agent (seen there, by its address or SNATed) or None (a pod without the agent)."""

    def __init__(self, name: str, world: "World") -> None:
        self.name, self.world, self.seen, self.calls = name, world, [], []

    async def request(self, op: str, **fields):
        self.calls.append(op)
        if self.world.broken == self.name:
            raise TunnelDropped("gone")
        if op == "probe-watch":
            self.seen = []
            return {}
        if op == "probe-seen":
            out, self.seen = self.seen, []
            return {"seen": out}
        assert op == "probe-dial"
        landing = self.world.routes.pop(0)
        probes = []
        for i in range(fields["count"]):
            port = 40000 + len(self.world.used)
            self.world.used.append(port)
            where = landing[i % len(landing)]
            probes.append({"local": [self.name, port], "ok": True})
            if where is not None:
                target = self.world.agents[where]
                target.seen.append([self.name, port] if where != self.name else ["node", 60000 + port])
        return {"probes": probes}


class World:
    def __init__(self, routes: list[list[str | None]]) -> None:
        self.routes, self.used, self.broken = routes, [], None
        self.agents = {n: FakeAgent(n, self) for n in ("p1", "p2")}

    def sessions(self):
        return {"p1": self.agents["p1"]}, list(self.agents.values())


async def test_rounds_retry_until_every_probe_reaches_an_agent():
    # Round 1: half the probes go to a departed pod; round 2: to itself (hairpin) and the other agent.
    world = World([["p2", None], ["p1", "p2"]])
    ok, why, rounds = await prove_routed(world.sessions, "10.96.0.9", 80, within=10, count=4,
                                         backoff=Backoff(0.01, 0.01))
    assert (ok, why, rounds) == (True, None, 2)
    # Every agent watched before each dial, and the watches were ended at the end.
    assert world.agents["p2"].calls[:3] == ["probe-watch", "probe-seen", "probe-watch"]
    assert world.agents["p2"].calls[-1] == "probe-watch"


async def test_rounds_end_at_the_bound_with_the_reason():
    world = World([[None]] * 1000)
    ok, why, rounds = await prove_routed(world.sessions, "10.96.0.9", 80, within=0.2, count=2,
                                         backoff=Backoff(0.01, 0.02))
    assert not ok and rounds >= 2 and why == ("from pod p1: 2 of 2 probes reached no agent: the node still "
                                              "sends some new connections to a pod without the agent")


@pytest.mark.parametrize("broken", ["p1", "p2"])
async def test_a_lost_session_fails_the_round_with_its_error(broken):
    world = World([["p1"]] * 1000)
    world.broken = broken
    ok, why, _ = await prove_routed(world.sessions, "10.96.0.9", 80, within=0.1, count=2,
                                    backoff=Backoff(0.01, 0.02))
    assert not ok and why == "from pod p1: TunnelDropped: gone"
