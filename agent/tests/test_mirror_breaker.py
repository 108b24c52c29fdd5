"""The mirror's circuit breaker as pure logic (agent/tpenv_agent/mirror.py ``Breaker``), on a fake
clock: when it stops copying, when it probes, and what one probe's answer does."""
from __future__ import annotations

from agent_testkit import Clock
from tpenv_agent.mirror import Breaker


def test_trips_after_k_failures_in_a_row_only():
    clock = Clock()
    b = Breaker(trip_after=3, cooldown=5, clock=clock)
    # Two failures, a success, two failures: never three in a row, copying goes on.
    assert not b.failure() and not b.failure()
    assert not b.success()
    assert not b.failure() and not b.failure()
    assert b.allow() and not b.refusing()
    # The third in a row trips it, once (the return value is the one log line).
    assert b.failure()
    assert b.refusing() and not b.allow()
    assert not b.failure()  # a copy already in flight failing too: no second log line, no extension


def test_one_probe_per_cooldown_and_its_answer_decides():
    clock = Clock()
    b = Breaker(trip_after=1, cooldown=5, clock=clock)
    assert b.failure()
    clock.now += 4.9
    assert b.refusing() and not b.allow()
    # Cooldown over: exactly one copy is let through as the probe; the others wait for its answer.
    clock.now += 0.2
    assert not b.refusing()
    assert b.allow()
    assert b.refusing() and not b.allow()
    # The probe fails: another full cooldown.
    assert not b.failure()
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.2
    assert b.allow()
    # The probe is answered: closed, everything copies again, and the caller logs the resume once.
    assert b.success()
    assert b.allow() and b.allow() and not b.refusing()
    assert not b.success()
