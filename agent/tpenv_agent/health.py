"""``/livez`` and ``/readyz`` on the health port, nothing else (contract §1).

``/livez`` answers while the event loop runs; ``/readyz`` once the sidecar says it is ready
(listeners and SSH bound). A request sent by the kubelet (``User-Agent: kube-probe/...``) tells
where the kubelet's probes come from in this pod (kubelet.py).
"""
from __future__ import annotations

import asyncio

from . import log as logs
from .bind import listen_socket
from .kubelet import PROBE_AGENT, KubeletPeers


class HealthServer:
    def __init__(self, host: str, port: int, ready: asyncio.Event, kubelet: KubeletPeers | None = None) -> None:
        self.host, self.port, self.ready, self.kubelet = host, port, ready, kubelet
        self._server: asyncio.AbstractServer | None = None
        self.log = logs.unit("health", "http")

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, sock=listen_socket(self.host, self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            probe = False
            while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = header.partition(b":")
                probe = probe or (name.strip().lower() == b"user-agent" and value.strip().startswith(PROBE_AGENT))
            if probe and self.kubelet is not None:
                self.kubelet.saw_probe(writer.get_extra_info("peername"))
            parts = line.split()
            path = parts[1].decode("latin-1") if len(parts) >= 2 else ""
            if path == "/livez":
                status, body = "200 OK", b"ok\n"
            elif path == "/readyz":
                status, body = ("200 OK", b"ok\n") if self.ready.is_set() else ("503 Service Unavailable", b"not ready\n")
            else:
                status, body = "404 Not Found", b"not found\n"
            writer.write(f"HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
                         "connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
