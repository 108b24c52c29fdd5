"""Issue 13: intercepted connections on parked port-forward streams, through a real cluster.

The kubelet's port-forward cannot half-close a stream, so this is where the out-of-band EOF is
proven for real: a caller in the cluster sends megabytes and half-closes, the laptop's handler
(which greets first) answers after reading to that EOF, and everything arrives intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import socketserver
import threading

import pytest

from test_intercept_kit import Intercepting, client_pod, curl, deploy_hello, kubectl, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ANSWER = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(65536))  # 2 MiB, known here and there

CALLER = r"""
import hashlib, json, os, socket, sys
sent = os.urandom(int(sys.argv[2]))
s = socket.create_connection((sys.argv[1], 80), timeout=30)
f = s.makefile("rb")
greeting = f.readline()
s.sendall(sent)
s.shutdown(socket.SHUT_WR)
got = f.read()
answer = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(65536))
print(json.dumps({"greeting": greeting.decode(), "hash_ok": got[:32] == hashlib.sha256(sent).digest(),
                  "answer_ok": got[32:] == answer, "got": len(got)}))
"""


ATTACK = r"""
import json, socket
def attempt(first):
    s = socket.create_connection(("127.0.0.1", 7923), timeout=20)
    s.sendall(first)
    out = b""
    while chunk := s.recv(4096):
        out += chunk
    return out.decode()
print(json.dumps({"wrong token": attempt(b"TPENV-STREAM 1 " + b"00" * 32 + b"\n"), "no hello": attempt(b"")}))
"""


class HashHandler(socketserver.ThreadingTCPServer):
    """Greets, reads to the caller's EOF, answers the hash of what came and ANSWER, closes."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.received: list[int] = []

        class H(socketserver.BaseRequestHandler):
            def handle(inner) -> None:  # noqa: N805
                sock: socket.socket = inner.request
                sock.sendall(b"hello\n")
                h, n = hashlib.sha256(), 0
                while chunk := sock.recv(1 << 16):
                    h.update(chunk)
                    n += len(chunk)
                self.received.append(n)
                sock.sendall(h.digest() + ANSWER)

        super().__init__(("127.0.0.1", 0), H)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_half_closed_bulk_rides_a_parked_stream_intact(namespace, tmp_path):
    ns = namespace
    # Stage 1: hello and a client pod; the cluster answers.
    deploy_hello(ns)
    client_pod(ns)
    wait_for("the cluster's answer", lambda: json.loads(curl(ns, f"http://hello.{ns}/"))["source"] == "cluster")

    # Stage 2: an all-TCP intercept to a handler that speaks first and answers after EOF.
    handler = HashHandler()
    run = Intercepting(tmp_path, "hello", "--port", str(handler.port), "--mount", "false", "-n", ns, "--debug")
    try:
        pods = run.ready()["pods"]
        wait_for("the laptop's greeting", lambda: "hello" in kubectl(
            "exec", "client", "--", "python3", "-c",
            "import socket,sys; s=socket.create_connection((sys.argv[1],80),timeout=5); print(s.recv(6).decode())",
            f"hello.{ns}", ns=ns, check=False).stdout)

        # Stage 3: 8 MiB up with a half-close, the hash and 2 MiB down: whole, in order.
        out = kubectl("exec", "client", "--", "python3", "-c", CALLER, f"hello.{ns}", str(8 << 20),
                      ns=ns, timeout=120).stdout
        r = json.loads(out.strip().splitlines()[-1])
        assert r == {"greeting": "hello\n", "hash_ok": True, "answer_ok": True, "got": 32 + len(ANSWER)}, r
        assert 8 << 20 in handler.received, handler.received

        # Stage 4, an attack: the app's own container (same pod, same loopback) tries to park a
        # stream at the agent's stream port without the session's token, and with none at all:
        # both are closed with nothing sent, and callers still reach the laptop.
        pod = pods[0]  # the intercepted pod (not the one the injection replaced, maybe still listed)
        app = kubectl("get", "pod", pod, "-o", "jsonpath={.spec.containers[0].name}", ns=ns).stdout
        assert app != "tpenv-agent"
        out = kubectl("exec", pod, "-c", app, "--", "python3", "-c", ATTACK, ns=ns, timeout=60).stdout
        assert json.loads(out.strip().splitlines()[-1]) == {"wrong token": "", "no hello": ""}, out
        r = json.loads(kubectl("exec", "client", "--", "python3", "-c", CALLER, f"hello.{ns}", "1000",
                               ns=ns, timeout=60).stdout.strip().splitlines()[-1])
        assert r["hash_ok"] and r["answer_ok"], r
    finally:
        rc = run.stop()
        handler.shutdown()
        handler.server_close()
    # Stage 5: the connections rode parked streams (the client's debug log names each join).
    err = "".join(run.drained_stderr())
    assert rc == 0, err[-3000:]
    assert "joined to 127.0.0.1:%d" % handler.port in err, err[-3000:]
    # ... each on a SPDY session of its own, as the SSH connection (kits/portforward.py: isolated
    # connections); a parked stream's session closes when its stream has ended.
    if os.environ.get("TPENV_PORTFORWARD_PROTOCOL", "auto") != "websocket":
        assert err.count(f"[spdy/{ns}/{pod}] session open") >= 2, err[-3000:]
