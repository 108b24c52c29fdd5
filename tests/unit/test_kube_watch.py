"""Kube.watch against a local HTTP server streaming watch events (real sockets, real client).

The server is a protocol-level double of the API server's watch: newline-delimited JSON events
on a long chunked response. Checked: events arrive in order as (type, object), bookmarks are
skipped, resourceVersion carries over a reconnect, close() ends the iterator promptly.
"""
from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from tests.unit.kubeconfig_kit import token_kubeconfig
from tpenv.kits.kube import Kube, What

pytestmark = pytest.mark.timeout(30)


def pod(name: str, rv: str) -> dict:
    return {"metadata": {"name": name, "resourceVersion": rv}}


class FakeWatch:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.hold = threading.Event()  # the second watch stays open until the test ends
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                q = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
                outer.requests.append(q)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                first = len(outer.requests) == 1
                events = [{"type": "ADDED", "object": pod("a", "1")},
                          {"type": "BOOKMARK", "object": pod("", "2")},
                          {"type": "MODIFIED", "object": pod("a", "3")}] if first else \
                         [{"type": "DELETED", "object": pod("a", "4")}]
                for ev in events:
                    line = json.dumps(ev).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                if not first:
                    outer.hold.wait(20)
                self.wfile.write(b"0\r\n\r\n")  # the server's watch timeout: the client reconnects

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


async def test_watch_events_reconnect_and_close(tmp_path):
    fake = FakeWatch()
    kc = token_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{fake.server.server_address[1]}")
    kube = await Kube.load(str(kc))
    try:
        # Stage 1: the first response's events, bookmark skipped; then the reconnect's event.
        seen = []
        async with kube.watch(kube.core.list_namespaced_pod, "team", what=What("watch", "pods", "team")) as events:
            async for kind, obj in events:
                seen.append((kind, obj["metadata"]["resourceVersion"]))
                if len(seen) == 3:
                    break
            assert seen == [("ADDED", "1"), ("MODIFIED", "3"), ("DELETED", "4")]
            # Stage 2: the reconnect resumed from the last resourceVersion, bookmarks asked for.
            assert fake.requests[1]["resourceVersion"] == "3"
            assert fake.requests[0]["allowWatchBookmarks"] == "true"
            # Stage 3: close() ends the iterator at once, though the server holds the response open.
            t0 = asyncio.get_running_loop().time()
            await events.close()
            await events.close()  # safe twice
            assert [e async for e in events] == []
            assert asyncio.get_running_loop().time() - t0 < 2
    finally:
        await kube.close()
        fake.close()
