"""The ``env`` capture: no namespaces, no root. A process reaches the cluster through

- a local proxy (SOCKS5 with remote names, HTTP CONNECT, plain HTTP) given to it in
  ``ALL_PROXY`` / ``HTTP_PROXY`` / ``HTTPS_PROXY`` (and lower case), ``NO_PROXY`` for loopback;
- port maps: every env value that names a cluster Service (``db``, ``db:3306``,
  ``mysql://user@db.shop:3306/x``, or its ClusterIP as the kubelet's ``DB_SERVICE_HOST`` gives it)
  is rewritten to a loopback address of its own (127.77.x.y) that listens on each of that
  Service's TCP ports and carries connections through the relay. A program that ignores proxy
  variables (a database client) still reaches ``db``, with its port unchanged.

A privileged Service port (< 1024) cannot be listened on without root: it is skipped with a
warning naming it (the proxy still reaches it).
"""
from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from tpenv.engine.outbound.core import OutboundCore
from tpenv.engine.outbound.proxied import ProxiedCapture
from tpenv.errors import TpenvError
from tpenv.kits.kube import What
from tpenv.kits.splice import CHUNK, splice

LOOPBACK_BASE = int(ipaddress.IPv4Address("127.77.0.1"))
_VALUE = re.compile(r"^(?P<pre>[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/]*@)?)?(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*)"
                    r"(?P<post>(?::\d{1,5})?(?:[/?#].*)?)$")


def proxy_env(port: int) -> dict[str, str]:
    """The proxy variables curl, Go, Python, Java (with -Djava.net.useSystemProxies) and Node read."""
    socks, http = f"socks5h://127.0.0.1:{port}", f"http://127.0.0.1:{port}"
    env = {"ALL_PROXY": socks, "HTTP_PROXY": http, "HTTPS_PROXY": http, "NO_PROXY": "localhost,127.0.0.1,::1"}
    return {**env, **{k.lower(): v for k, v in env.items()}}


def split_value(value: str) -> tuple[str, str, str] | None:
    """``(before, host, after)`` of an env value that is a host, host:port or URL; else None."""
    m = _VALUE.match(value.strip())
    return (m["pre"] or "", m["host"], m["post"]) if m else None


class PortMaps:
    """Loopback listeners standing for cluster Services, made on demand by ``rewrite(env)``."""

    def __init__(self, core: OutboundCore) -> None:
        self.core = core
        self.log = core.log
        self.by_service: dict[str, str] = {}  # "name.ns" -> loopback address
        self._servers: list[asyncio.base_events.Server] = []
        self._conns: set[asyncio.Task] = set()

    async def rewrite(self, env: Mapping[str, str], namespace: str) -> dict[str, str]:
        """``env`` with cluster Service hosts replaced by their port maps' addresses; names are
        looked up as a pod of ``namespace`` would."""
        services = await self._services(namespace)
        out = dict(env)
        for key, value in env.items():
            parts = split_value(value)
            if parts is None:
                continue
            pre, host, post = parts
            svc = self._service_for(host, namespace, services)
            if svc is None:
                continue
            address = await self._map(svc)
            out[key] = f"{pre}{address}{post}"
            self.log.info("env %s: %s -> %s (port map of Service %s.%s)", key, host, address,
                          svc["metadata"]["name"], svc["metadata"]["namespace"])
        return out

    async def _services(self, namespace: str) -> list[dict[str, Any]]:
        kube = self.core.kube
        try:
            return (await kube.call(kube.core.list_namespaced_service, namespace,
                                    what=What("list", "services", namespace)))["items"]
        except TpenvError as e:
            self.log.warning("no port maps for namespace %s: %s", namespace, e)
            return []

    @staticmethod
    def _service_for(host: str, namespace: str, services: list[dict[str, Any]]) -> dict[str, Any] | None:
        h = host.lower().rstrip(".")
        for svc in services:
            name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
            spec = svc.get("spec") or {}
            if h in (name, f"{name}.{ns}", f"{name}.{ns}.svc") or h.startswith(f"{name}.{ns}.svc."):
                return svc
            if h in (spec.get("clusterIPs") or [spec.get("clusterIP")]) and h not in ("None", ""):
                return svc
        return None

    async def _map(self, svc: dict[str, Any]) -> str:
        key = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}"
        if key in self.by_service:
            return self.by_service[key]
        address = str(ipaddress.IPv4Address(LOOPBACK_BASE + len(self.by_service)))
        self.by_service[key] = address
        target = f"{key}.svc.{self.core.rules.cluster_domain}"
        for p in (svc.get("spec") or {}).get("ports") or []:
            if (p.get("protocol") or "TCP") != "TCP":
                continue
            port = int(p["port"])
            try:
                server = await asyncio.start_server(lambda r, w, port=port: self._accept(r, w, target, port),
                                                    address, port, limit=CHUNK)
            except OSError as e:
                self.log.warning("port map %s:%s for %s not made: %s (the proxy still reaches it)",
                                 address, port, key, e.strerror)
                continue
            self._servers.append(server)
            self.log.info("port map %s:%s -> %s:%s", address, port, key, port)
        return address

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer, host, port))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int) -> None:
        try:
            up_r, up_w = await self.core.dial(host, port)
        except TpenvError as e:
            self.log.info("port map to %s:%s: %s", host, port, e)
            writer.close()
            return
        await splice(reader, writer, up_r, up_w)

    def close(self) -> None:
        for s in self._servers:
            s.close()
        for t in self._conns:
            t.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._conns, return_exceptions=True)


class EnvCapture(ProxiedCapture):
    """The proxy and the port maps of one core; ``env_for(env, namespace)`` gives a process's env."""

    def __init__(self, core: OutboundCore) -> None:
        super().__init__(core)
        self.maps = PortMaps(core)

    def started(self) -> str:
        return f"env mode: proxy on 127.0.0.1:{self.proxy.port} (SOCKS5 and HTTP)"

    def close(self) -> None:
        super().close()
        self.maps.close()

    async def wait_closed(self) -> None:
        await super().wait_closed()
        await self.maps.wait_closed()

    async def env_for(self, env: Mapping[str, str], namespace: str) -> dict[str, str]:
        assert self.proxy.port is not None
        rewritten = await self.maps.rewrite(env, namespace)
        return {**rewritten, **proxy_env(self.proxy.port)}


__all__ = ["EnvCapture", "PortMaps", "proxy_env", "split_value"]
