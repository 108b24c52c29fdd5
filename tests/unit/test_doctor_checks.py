"""tpenv doctor's pure parts and its machine checks: the runner (timing, timeouts, a check's bug),
the exit code, the Service repair plan, stale session files, and the CLI without a cluster."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from tpenv.engine.doctor import FAIL, OK, WARN, Outcome, exit_code, repair, run_check, run_checks
from tpenv.engine.doctor.cluster import _node_has
from tpenv.engine.strayports import patch_command as _patch_command, repaired as _repaired, stray_in
from tpenv.engine.doctor.machine import _stale_session_files, session_state
from tpenv.errors import NotFound

TPENV = Path(sys.executable).parent / "tpenv"


# --- stage 1: the runner turns every outcome into a timed finding --------------------------------------------------

async def test_a_check_that_raises_or_hangs_is_a_failure_not_a_crash():
    async def bug():
        raise KeyError("x")

    async def hangs():
        await asyncio.Event().wait()

    async def missing():
        raise NotFound("no such thing", hint="create it")

    found = await run_checks([("a/bug", bug), ("a/hangs", hangs), ("a/missing", missing)], timeout=0.2)
    assert [f.status for f in found] == [FAIL, FAIL, FAIL]
    assert "KeyError" in found[0].detail
    assert "no answer within 0.2s" in found[1].detail and found[1].seconds >= 0.2
    assert (found[2].detail, found[2].fix) == ("no such thing", "create it")
    assert exit_code(found) == 1


async def test_warnings_exit_0_and_fix_runs_only_repairs_of_problems():
    ran = []

    async def fixed():
        ran.append("fixed")
        return ["changed one thing"]

    async def healthy():
        return Outcome(OK, "fine", repair=fixed)

    async def broken():
        return Outcome(WARN, "stale", fix="rm it", repair=fixed)

    found = [await run_check("a/healthy", healthy), await run_check("a/broken", broken)]
    assert exit_code(found) == 0
    assert [f.fixable for f in found] == [False, True]
    await repair(found)
    assert ran == ["fixed"]
    assert found[1].status == OK and found[1].changed == ["changed one thing"]


# --- stage 2: what the cluster checks decide from objects ----------------------------------------------------------

def test_a_service_on_tpenv_port_goes_back_to_the_number():
    svc = {"metadata": {"name": "hello", "annotations": {}},
           "spec": {"ports": [{"port": 80, "targetPort": "tpenv-8080"}, {"port": 81, "targetPort": "metrics"}]}}
    fixed = _repaired(svc, ["tpenv-8080"])
    assert [p["targetPort"] for p in fixed["spec"]["ports"]] == [8080, "metrics"]
    assert svc["spec"]["ports"][0]["targetPort"] == "tpenv-8080"  # the original is left alone
    assert _patch_command("ns", svc, fixed) == ("kubectl -n ns patch service hello --type=json -p "
                                                """'[{"op":"replace","path":"/spec/ports/0/targetPort","value":8080}]'""")
    assert _repaired(svc, ["metrics"]) is None  # not tpenv's name: no guess


def test_stray_services_are_those_naming_a_port_no_live_pod_has():
    def svc(name, target, sel=None):
        return {"metadata": {"name": name, "namespace": "ns"}, "spec": {"selector": sel or {"app": name},
                                                                       "ports": [{"port": 80, "targetPort": target}]}}

    def pod(app, port_name, deleting=False):
        meta = {"labels": {"app": app}, "namespace": "ns", **({"deletionTimestamp": "x"} if deleting else {})}
        return {"metadata": meta, "spec": {"containers": [{"ports": [{"name": port_name, "containerPort": 8080}]}]}}
    services = [svc("reverted", "tpenv-8080"), svc("fine", "http"), svc("numeric", 8080), svc("nopods", "tpenv-1"),
                svc("rolling", "tpenv-8080"), svc("foreign", "metrics")]
    pods = [pod("reverted", "http"), pod("fine", "http"), pod("numeric", "http"),
            pod("rolling", "http"), pod("rolling", "tpenv-8080"), pod("foreign", "http"),
            pod("nopods", "tpenv-1", deleting=True)]
    other_ns = pod("reverted", "tpenv-8080")
    other_ns["metadata"]["namespace"] = "elsewhere"  # same labels, another namespace: not its pod
    pods.append(other_ns)
    found = {s.name: s for s in stray_in(services, pods)}
    # A pod still having the port (mid-rollout) keeps the Service valid; a deleting pod does not count.
    assert sorted(found) == ["foreign", "reverted"]
    assert found["reverted"].target["spec"]["ports"][0]["targetPort"] == 8080
    assert found["foreign"].target is None  # not tpenv's name: reported, never guessed


def test_node_images_listed_by_any_of_their_names():
    node = {"status": {"images": [{"names": ["docker.io/tpenv/agent:abc"]}]}}
    assert _node_has([node], "tpenv/agent:abc")
    assert not _node_has([node], "tpenv/agent:other")
    assert not _node_has([{"status": {}}], "tpenv/agent:abc")


# --- stage 3: machine checks on real files -------------------------------------------------------------------------

async def test_session_files_of_a_dead_process_are_reported_and_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "aa.json").write_text(json.dumps({"id": "aa", "pid": dead.pid, "socket": str(tmp_path / "aa.sock"),
                                                  "config": None, "started": 0}))
    (tmp_path / "aa.sock").write_text("")
    (tmp_path / "bb.json").write_text(json.dumps({"id": "bb", "pid": os.getpid(), "socket": str(tmp_path / "bb.sock"),
                                                  "config": None, "started": 0}))
    assert _stale_session_files(tmp_path) == [tmp_path / "aa.json", tmp_path / "aa.sock"]
    finding = await run_check("machine/sessions", session_state(tmp_path))
    assert finding.status == WARN and "rm " in finding.fix
    await repair([finding])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bb.json"]


def test_cli_without_a_cluster_lists_and_times_every_check(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none"),
           "TPENV_SESSION_STATE_DIR": str(tmp_path / "sessions")}
    cp = subprocess.run([str(TPENV), "-o", "json", "doctor"], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=60)
    report = json.loads(cp.stdout)
    names = [c["name"] for c in report["checks"]]
    assert names[:3] == ["machine/python", "machine/sshfs", "machine/firewall"]
    assert names[-1] == "cluster/api" and report["checks"][-1]["status"] == FAIL
    assert all(isinstance(c["seconds"], float) for c in report["checks"])
    assert cp.returncode == 1 and report["ok"] is False


def test_a_check_slower_than_the_check_timeout_setting_fails_naming_it(tmp_path):
    # An API server that takes 3s to answer /version; doctor's checks may take 0.5s each.
    import http.server
    import threading

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            threading.Event().wait(3)
            body = b'{"gitVersion": "v1.34.4"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "kubeconfig").write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "slow",
            "clusters": [{"name": "slow", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "slow", "context": {"cluster": "slow", "user": "u", "namespace": "default"}}]}))
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "kubeconfig"),
               "TPENV_SESSION_STATE_DIR": str(tmp_path / "sessions"), "TPENV_DOCTOR_CHECK_TIMEOUT": "0.5"}
        cp = subprocess.run([str(TPENV), "-o", "json", "doctor"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    finally:
        server.shutdown()
    api = next(c for c in json.loads(cp.stdout)["checks"] if c["name"] == "cluster/api")
    assert (api["status"], api["detail"]) == (FAIL, "no answer within 0.5s"), api


# --- stage 4: the tunnel probe wants a byte back, not only a stream opened -----------------------------------------

class LocalTunnel:
    """Stands for the port-forward: streams to 127.0.0.1:port (a real socket, a real server)."""

    async def open_stream(self, port):
        return await asyncio.open_connection("127.0.0.1", port)


async def serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_round_trip_is_timed_only_when_a_byte_comes_back(monkeypatch):
    from tpenv.engine.doctor import probes

    monkeypatch.setattr(probes, "ANSWER_TIMEOUT", 0.3)
    seen = []

    async def http(reader, writer):
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
        await writer.drain()
        writer.close()

    async def silent(reader, writer):
        await reader.read()  # waits for the client, says nothing

    async def hangs_up(reader, writer):
        await reader.readuntil(b"\r\n\r\n")  # read all (unread bytes would make the close a reset)
        writer.close()

    answers = {}
    for name, handler in (("http", http), ("silent", silent), ("hangs_up", hangs_up)):
        server, port = await serve(handler)
        async with server:
            answers[name] = await probes.pod_round_trip(LocalTunnel(), port)
    assert seen == [probes.PROBE]
    answered, opened, why = answers["http"]
    assert answered is not None and answered >= opened and why == ""
    assert answers["silent"][0] is None and answers["silent"][2] == "no byte within 0.3s"
    assert answers["hangs_up"][0] is None and answers["hangs_up"][2] == "it closed without a byte"
