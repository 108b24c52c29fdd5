"""Replace mode's in-pod restore: when the agent decides the client is gone (restorer.py).

The decision is pure timing over the registry's intercepts, tested here with short graces and the
API call replaced by a recorder; the call itself runs against the real API server in
tests/e2e/test_intercept_replace.py (kill -9 of the client).
"""
from __future__ import annotations

import asyncio

import pytest

from tpenv_agent.restorer import Restorer


class Held:
    """The two things Restorer reads of the registry: ``all()`` and the ``on_end`` callbacks."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.on_end: list = []

    def hold(self, name: str) -> None:
        self.items.append(name)

    def end(self, name: str) -> None:
        self.items.remove(name)
        for cb in self.on_end:
            cb(name)

    def all(self) -> list[str]:
        return list(self.items)


def restorer(held: Held, applied: list[float]) -> Restorer:
    r = Restorer(held, "/nonexistent", grace=0.3, start_grace=0.6)
    loop = asyncio.get_running_loop()

    def apply() -> str:
        applied.append(loop.time())
        return "restored"

    r.apply = apply  # type: ignore[method-assign]
    return r


@pytest.mark.asyncio
async def test_no_client_ever_connects_restores_after_the_start_grace():
    held, applied = Held(), []
    r = restorer(held, applied)
    start = asyncio.get_running_loop().time()
    r.start()
    await asyncio.wait_for(r._task, 5)
    assert r.done == "restored" and len(applied) == 1 and applied[0] - start >= 0.6


@pytest.mark.asyncio
async def test_held_intercepts_keep_the_replace_and_their_end_starts_the_grace():
    held, applied = Held(), []
    r = restorer(held, applied)
    held.hold("s:web")
    r.start()
    await asyncio.sleep(1.0)  # past the start grace: still held, nothing applied
    assert applied == []
    ended = asyncio.get_running_loop().time()
    held.end("s:web")  # the lease expired (kill -9)
    await asyncio.wait_for(r._task, 5)
    assert len(applied) == 1 and applied[0] - ended >= 0.3


@pytest.mark.asyncio
async def test_a_client_back_within_the_grace_keeps_the_replace():
    held, applied = Held(), []
    r = restorer(held, applied)
    held.hold("s:web")
    r.start()
    held.end("s:web")
    await asyncio.sleep(0.1)
    held.hold("s:web")  # reconnected (a network blip)
    await asyncio.sleep(1.0)
    assert applied == [] and not r._task.done()
    r.close()
    await r.wait_closed()
    r.close()  # safe twice
    await r.wait_closed()
