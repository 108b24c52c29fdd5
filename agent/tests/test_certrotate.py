"""The manager's certificate rotation: due two thirds into the lifetime, the lifetime kept, and
the order that keeps the API server trusting whatever the manager serves (a real TLS server)."""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl

import pytest

from tpenv_agent.certrotate import Rotator
from tpenv_agent.tlscert import generate, lifetime_of, renew_at, validity

NS = "tpenv"


@pytest.mark.parametrize("lifetime", [dt.timedelta(minutes=3), dt.timedelta(hours=2), dt.timedelta(days=1825)])
def test_renewal_is_due_two_thirds_in_and_the_lifetime_survives_a_rotation(lifetime):
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    tls = generate(NS, lifetime, now=now)
    start, end = validity(tls["tls.crt"])
    assert end == now + lifetime and start < now
    assert start + (end - start) * 0.66 < renew_at(tls["tls.crt"]) < start + (end - start) * 0.67
    assert abs(lifetime_of(tls["tls.crt"]) - lifetime) < dt.timedelta(seconds=1)


class Api:
    """The two objects the rotation writes, as the API server would keep them; ``log``: the order."""

    def __init__(self, tls: dict[str, bytes]) -> None:
        b64 = {k: base64.b64encode(v).decode() for k, v in tls.items()}
        self.objects = {
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/tpenv-agent-injector": {
                "webhooks": [{"name": n, "clientConfig": {"service": {"namespace": NS}, "caBundle": b64["ca.crt"]}}
                             for n in ("a", "b")]},
            f"/api/v1/namespaces/{NS}/secrets/tpenv-manager-tls": {"data": dict(b64)},
        }
        self.log: list[str] = []

    def __call__(self, method: str, path: str, body: dict | None = None, timeout: float = 10) -> dict:
        self.log.append(f"{method} {path.rsplit('/', 1)[-1]}")
        if method == "PUT":
            self.objects[path] = body
        return self.objects[path]


async def handshake(port: int, ca: bytes) -> bool:
    ctx = ssl.create_default_context(cadata=ca.decode())
    try:
        _, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=f"tpenv-manager.{NS}.svc")
    except ssl.SSLError:
        return False
    w.close()
    return True


def test_rotation_trusts_both_then_serves_the_new_then_stores_it(tmp_path):
    async def main():
        old = generate(NS, dt.timedelta(minutes=3))
        (tmp_path / "tls.crt").write_bytes(old["tls.crt"])
        (tmp_path / "tls.key").write_bytes(old["tls.key"])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        api = Api(old)
        rotator = Rotator(ctx, dict(old), NS, api, tmp_path / "run", "tpenv-agent-injector", "tpenv-manager-tls")
        async with server:
            assert await handshake(port, old["ca.crt"])
            await rotator.rotate()
            new = rotator.material
            assert new["tls.crt"] != old["tls.crt"]
            # The live server now presents the new certificate: the new CA verifies it, the old does not.
            assert await handshake(port, new["ca.crt"]) and not await handshake(port, old["ca.crt"])
        hook = api.objects["/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/tpenv-agent-injector"]
        for w in hook["webhooks"]:
            bundle = base64.b64decode(w["clientConfig"]["caBundle"])
            assert new["ca.crt"] in bundle and old["ca.crt"] in bundle  # both trusted during the swap
        stored = api.objects[f"/api/v1/namespaces/{NS}/secrets/tpenv-manager-tls"]["data"]
        assert base64.b64decode(stored["tls.crt"]) == new["tls.crt"]
        # Trust first, store last: a restart at any point serves a certificate the bundle accepts.
        assert api.log == ["GET tpenv-agent-injector", "PUT tpenv-agent-injector", "GET tpenv-manager-tls",
                           "PUT tpenv-manager-tls"]
        assert oct((tmp_path / "run" / "tls.key").stat().st_mode & 0o777) == "0o600"
    asyncio.run(main())


def test_rotation_without_a_selected_namespace_still_renews_the_certificate(tmp_path):
    # No namespace selected: the configuration has no entries (webhooks: []) and nothing to trust;
    # the serving certificate and its Secret are still renewed.
    async def main():
        old = generate(NS, dt.timedelta(minutes=3))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        api = Api(old)
        api.objects["/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/tpenv-agent-injector"] = {}
        rotator = Rotator(ctx, dict(old), NS, api, tmp_path / "run", "tpenv-agent-injector", "tpenv-manager-tls")
        await rotator.rotate()
        stored = api.objects[f"/api/v1/namespaces/{NS}/secrets/tpenv-manager-tls"]["data"]
        assert base64.b64decode(stored["tls.crt"]) == rotator.material["tls.crt"] != old["tls.crt"]
        assert "PUT tpenv-agent-injector" not in api.log
    asyncio.run(main())
