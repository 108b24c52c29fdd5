"""Secret tpenv-auth made on a first intercept in a namespace (engine/tunnels.ensure_auth_material).
Injection has just read it as missing, so it creates first and saves a round trip; a create that
lost the race to another client (409) reads the winner's keys. The API server is faked."""
from __future__ import annotations

import asyncio
import base64
import copy
from types import SimpleNamespace
from typing import Any

import pytest

from tpenv.engine.injection import auth_secret_manifest
from tpenv.engine.tunnels import ensure_auth_material
from tpenv.errors import NotFound, UpdateConflict
from tpenv_agent.authkeys import auth_material


class FakeKube:
    """One namespace's Secrets; ``racer``: another client's Secret, stored just before our create."""

    def __init__(self, stored: dict | None = None, racer: dict | None = None) -> None:
        self.stored, self.racer, self.calls = stored, racer, []
        self.core = SimpleNamespace(read_namespaced_secret=self.read, create_namespaced_secret=self.create)

    async def call(self, fn, *args: Any, what: Any, **kw: Any) -> Any:
        self.calls.append(fn.__name__)
        return fn(*args, **kw)

    def read(self, name: str, ns: str) -> dict:
        if self.stored is None:
            raise NotFound(f"secret {name} not found")
        return copy.deepcopy(self.stored)

    def create(self, ns: str, body: dict) -> dict:
        if self.racer is not None:
            self.stored, self.racer = self.racer, None
        if self.stored is not None:
            raise UpdateConflict("create secrets: conflict (already exists)")
        self.stored = copy.deepcopy(body)
        return copy.deepcopy(body)


def keys(secret: dict) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def run(kube: FakeKube, **kw: Any) -> dict[str, bytes]:
    return asyncio.run(ensure_auth_material(kube, "ns", **kw))  # type: ignore[arg-type]


def test_just_read_as_missing_creates_at_once():
    kube = FakeKube()
    got = run(kube, seen_missing=True)
    assert kube.calls == ["create"] and got == keys(kube.stored)


def test_a_lost_race_reads_the_winners_keys():
    theirs = auth_secret_manifest("ns", auth_material())
    kube = FakeKube(racer=theirs)
    got = run(kube, seen_missing=True)
    assert kube.calls == ["create", "read"] and got == keys(theirs)


@pytest.mark.parametrize("there", [True, False])
def test_unknown_reads_first(there: bool):
    stored = auth_secret_manifest("ns", auth_material()) if there else None
    kube = FakeKube(stored=stored)
    got = run(kube)
    assert kube.calls == (["read"] if there else ["read", "create"]) and got == keys(kube.stored)
