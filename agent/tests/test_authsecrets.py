"""authsecrets.AuthSecrets: a namespace's tpenv-auth is confirmed before each injection, re-created
after a deletion, and a failing namespace is backed off, not retried per pod."""
from __future__ import annotations

import asyncio
import urllib.error

from tpenv_agent.authsecrets import BACKOFF_MAX, BACKOFF_MIN, AuthSecrets


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Api:
    """The API server's answers to POST tpenv-auth: created, already there, or refused."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.exists: set[str] = set()
        self.refuse: Exception | None = None

    def create(self, namespace: str) -> bool:
        self.calls.append(namespace)
        if self.refuse is not None:
            raise self.refuse
        if namespace in self.exists:
            return False
        self.exists.add(namespace)
        return True


def test_confirmed_at_every_injection_so_a_deleted_secret_comes_back():
    api, clock = Api(), Clock()
    auth = AuthSecrets(api.create, clock)
    assert asyncio.run(auth.ensure("shop")) is None and api.calls == ["shop"] and "shop" in api.exists
    assert asyncio.run(auth.ensure("shop")) is None and api.calls == ["shop", "shop"]  # 409: there
    api.exists.clear()  # someone deletes the Secret; the next pod's admission makes it again
    assert asyncio.run(auth.ensure("shop")) is None and "shop" in api.exists


def test_a_refusal_is_backed_off_doubling_and_says_why():
    api, clock = Api(), Clock()
    api.refuse = urllib.error.HTTPError("u", 403, "Forbidden", {}, None)  # type: ignore[arg-type]
    auth = AuthSecrets(api.create, clock)
    why = asyncio.run(auth.ensure("shop"))
    assert why is not None and "HTTP 403" in why and "tpenv-auth" in why
    # Within the backoff: answered at once, no call, the reason and when the next try is.
    for _ in range(5):
        assert "retrying in" in asyncio.run(auth.ensure("shop"))
    assert api.calls == ["shop"]
    clock.now += BACKOFF_MIN
    asyncio.run(auth.ensure("shop"))
    assert api.calls == ["shop", "shop"]
    clock.now += BACKOFF_MIN  # the delay doubled: still backing off
    assert "retrying in" in asyncio.run(auth.ensure("shop")) and len(api.calls) == 2
    # Many failures: the delay stops at BACKOFF_MAX.
    for _ in range(20):
        clock.now += BACKOFF_MAX
        asyncio.run(auth.ensure("shop"))
    assert auth._failed["shop"][1] - clock.now <= BACKOFF_MAX
    # Fixed: the next try after the backoff succeeds and clears it.
    api.refuse = None
    clock.now += BACKOFF_MAX
    assert asyncio.run(auth.ensure("shop")) is None and auth.failing() == {}
