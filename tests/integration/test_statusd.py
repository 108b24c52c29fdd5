"""tpenv.engine.statusd over a real Unix socket: publish, status, down, stale sessions."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from tpenv.engine.statusd import StatusServer, find_sessions, request_down, request_env, request_status
from tpenv.errors import NotFound, UsageError

WAIT = 20.0
pytestmark = pytest.mark.timeout(60)

UNITS = {"units": [{"key": ["handler", "web"], "state": "ready", "since": 1.0, "last_error": None, "restarts": 2}],
         "config_error": None, "stopping": False}


def server(state_dir, on_down=lambda: None, **kw):
    return StatusServer(snapshot=lambda: UNITS, on_down=on_down, state_dir=state_dir, config="telepresence.yaml", **kw)


# --- stage 1: a session is published, found, asked, and unpublished --------------------------


async def test_status_round_trip_and_unpublish(tmp_path):
    async with server(tmp_path / "sessions", session_id="s1") as srv:
        [found] = find_sessions(tmp_path / "sessions")
        assert found.id == "s1" and found.pid == srv.info.pid and found.config.endswith("telepresence.yaml")
        assert (tmp_path / "sessions" / "s1.json").stat().st_mode & 0o077 == 0
        reply = await request_status(found)
        assert reply["units"] == UNITS["units"] and reply["session"]["id"] == "s1"
    assert find_sessions(tmp_path / "sessions") == []
    with pytest.raises(NotFound):
        await request_status(found)
    await srv.stop()  # safe twice


async def test_unknown_and_garbage_requests_get_an_error_not_a_crash(tmp_path):
    async with server(tmp_path, session_id="s2") as srv:
        reader, writer = await asyncio.open_unix_connection(srv.info.socket)
        writer.write(b"not json\n" + json.dumps({"request": "reboot"}).encode() + b"\n")
        first = json.loads(await asyncio.wait_for(reader.readline(), WAIT))
        second = json.loads(await asyncio.wait_for(reader.readline(), WAIT))
        assert not first["ok"] and not second["ok"] and "reboot" in second["error"]
        writer.close()
        assert (await request_status(srv.info.socket))["ok"]  # still serving


async def test_env_is_answered_per_name_and_never_in_status(tmp_path):
    # `tpenv env NAME` asks the running session; the env (secrets) stays out of status and the state file.
    envs = {"web": {"DB_PASSWORD": "s3cr3t", "LANG": "C.UTF-8"}}
    async with server(tmp_path, session_id="s9", env_of=envs.get) as srv:
        assert await request_env(srv.info, "web") == envs["web"]
        assert await request_env(srv.info, "other") is None
        assert "s3cr3t" not in json.dumps(await request_status(srv.info))
        assert "s3cr3t" not in (tmp_path / "s9.json").read_text()
    async with server(tmp_path, session_id="s10") as srv:  # a session without intercepts
        assert await request_env(srv.info, "web") is None


# --- stage 2: down from another shell ------------------------------------------------------------


async def test_down_calls_back_and_waits_until_the_session_stopped(tmp_path):
    asked = asyncio.Event()
    srv = server(tmp_path, on_down=asked.set, session_id="s3")
    await srv.start()

    async def session_main():  # what tpenv up does: stop units, then close the server
        await asked.wait()
        await srv.stop()

    main = asyncio.create_task(session_main())
    assert await request_down(find_sessions(tmp_path)[0], wait=WAIT)
    await asyncio.wait_for(main, WAIT)
    assert find_sessions(tmp_path) == []


async def test_down_without_waiting_only_needs_the_acknowledgement(tmp_path):
    asked = asyncio.Event()
    async with server(tmp_path, on_down=asked.set) as srv:
        assert await request_down(srv.info, wait=None)
        assert asked.is_set()


# --- stage 3: stale and foreign files ---------------------------------------------------------


async def test_files_of_dead_sessions_are_ignored_and_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # exited and reaped: nobody has this pid now (reuse within a test is negligible)
    stale = tmp_path / "old.json"
    stale.write_text(json.dumps({"id": "old", "pid": pid, "socket": str(tmp_path / "old.sock"),
                                 "config": None, "started": 1.0}))
    (tmp_path / "junk.json").write_text("{half")
    async with server(tmp_path, session_id="live"):
        assert [s.id for s in find_sessions(tmp_path)] == ["live"]
    assert not stale.exists()
    assert (tmp_path / "junk.json").exists()  # not ours to delete


async def test_no_session_is_a_clear_error(tmp_path):
    with pytest.raises(NotFound, match="not running"):
        await request_down(tmp_path / "nobody.sock")


async def test_unwritable_state_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UsageError, match="cannot publish"):
        await server(blocker / "sessions").start()
