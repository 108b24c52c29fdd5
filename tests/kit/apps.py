"""The apps of the intercept scenarios, for the e2e tests and the benchmarks (no pytest here).

- ``testapp_image()``: the test app image of this checkout, ``tpenv/testapp:<content hash>``
  (tests/cluster/images.py, imported by `cluster up`); never the shared ``:dev`` alias, which
  another worktree's `cluster up` may re-point while a test runs;
- ``echo_app(name, replicas)``: a test app echo Deployment (port ``http`` 8080) and
  its Service (port ``web`` 80), as dicts for ``kubectl.apply``;
- ``write_handler(dir, version)``: a small local HTTP server (like examples/hello/server.py) for
  ``run:``, answering JSON with ``source: laptop``, its name, a version string and its pid;
  ``set_version`` edits that version in place (a save the handler's watch restarts it on).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from tests.cluster.images import testapp_image_ref

HANDLER = '''"""A test handler: answers every GET with JSON saying who answered."""
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "v1"


class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"source": "laptop", "name": os.environ.get("NAME"), "version": VERSION,
                           "pid": os.getpid(), "path": self.path,
                           "cluster_env": "KUBERNETES_SERVICE_HOST" in os.environ}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


port = int(os.environ["PORT"])
server = ThreadingHTTPServer(("127.0.0.1", port), H)
print(f"serving {os.environ.get('NAME')} {VERSION} on {port} pid {os.getpid()}", flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    pass
'''


@functools.lru_cache(maxsize=1)
def testapp_image() -> str:
    # Once per process: the image `cluster up` imported, even if tests/cluster/apps is edited meanwhile.
    return testapp_image_ref()


# Its name starts with "test": test modules import it, and pytest would collect it there as a
# test that cannot fail (and count it as passed).
testapp_image.__test__ = False

def write_handler(directory: Path, version: str = "v1") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "server.py"
    path.write_text(HANDLER.replace('VERSION = "v1"', f'VERSION = "{version}"'))
    return path


def set_version(server: Path, version: str) -> None:
    text = re.sub(r'VERSION = "[^"]*"', f'VERSION = "{version}"', server.read_text())
    server.write_text(text)


def echo_app(name: str, replicas: int = 1) -> list[dict]:
    labels = {"app": name}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
         "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "terminationGracePeriodSeconds": 2,
                      "containers": [{"name": "app", "image": testapp_image(), "imagePullPolicy": "Never",
                                      "env": [{"name": "ECHO_QUIET", "value": "1"}],
                                      "ports": [{"name": "http", "containerPort": 8080}],
                                      "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
         "spec": {"selector": labels, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}},
    ]
