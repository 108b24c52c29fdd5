"""Sync mode against the real sidecar process: its chrooted asyncssh SFTP server on 127.0.0.1:0,
reached through tpenv's AgentSession (real SSH, certificates, the ``mounts`` op).

Stages: the pod's volumes (files, a subdirectory, an inside symlink, one leading out, a
Secret-like ``..data`` symlink farm) copied at start; a local edit pushed; pod edits pulled;
deletions both ways; no echo; stop flushes the last local edit; a second run over the kept copy;
a temporary directory removed on stop; the size limits refusing with the setting's name.
"""
from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent" / "tests"))
from agent_testkit import App, run_agent  # noqa: E402

from tpenv.engine.syncmount import MARKER, SyncMount  # noqa: E402
from tpenv.engine.units import State  # noqa: E402
from tpenv.errors import UsageError  # noqa: E402
from tpenv.kits.agent_client import AgentSession, make_auth_material  # noqa: E402
from tpenv.settings import Settings  # noqa: E402

pytestmark = pytest.mark.timeout(90)


def settings(**mounts) -> Settings:
    return Settings.model_validate({"mounts": {"sync_interval": 0.3, "sync_debounce": 0.05, **mounts}})


def pod_volumes(served: Path) -> None:
    data = served / "var" / "data"
    (data / "sub").mkdir(parents=True)
    (data / "hello.txt").write_text("from the pod\n")
    os.chmod(data / "hello.txt", 0o640)
    os.utime(data / "hello.txt", (1_600_000_000, 1_600_000_000))
    (data / "sub" / "nested.txt").write_text("nested\n")
    os.symlink("sub/nested.txt", data / "link")
    os.symlink("/etc/hostname", data / "escape")
    cfg = served / "etc" / "cfg"  # what kubelet makes of a Secret volume
    (cfg / "..2024_01").mkdir(parents=True)
    (cfg / "..2024_01" / "token").write_text("jwt.jwt.jwt")
    os.symlink("..2024_01", cfg / "..data")
    os.symlink("..data/token", cfg / "token")


class Pod:
    """The sidecar serving ``served`` and one AgentSession to it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.material = make_auth_material()
        self.served = tmp / "mounts"

    async def __aenter__(self) -> "Pod":
        self.served.mkdir()
        pod_volumes(self.served)
        self.app = await App("app").__aenter__()
        self._agent_cm = run_agent(self.tmp, self.material, [f"0:{self.app.port}:http"],
                                   extra=["--mount", "/var/data", "--mount", "/etc/cfg"])
        self.agent = await self._agent_cm.__aenter__()
        self.session = AgentSession("s1", ca_key=self.material["ca_key"], host_key_pub=self.material["host_key.pub"],
                                    port=self.agent.ssh)
        await self.session.connect()
        self.mounts = (await self.session.mounts())["mounts"]
        return self

    async def __aexit__(self, *exc) -> None:
        self.session.close()
        await self.session.wait_closed()
        await self._agent_cm.__aexit__(*exc)
        await self.app.__aexit__(*exc)

    def mount(self, local: Path | None, **kw) -> SyncMount:
        return SyncMount(self.session.sftp, local, self.mounts, name="store", settings=settings(**kw))


def read(p: Path) -> str:
    return p.read_text()


async def test_initial_copy_then_both_ways_until_stop_flushes(tmp_path):
    local = tmp_path / "vol"
    async with Pod(tmp_path) as pod:
        data, served = local / "var" / "data", pod.served / "var" / "data"
        m = pod.mount(local)
        await m.start()
        try:
            # Stage 1: the first copy is complete when start() returns: content, modes, mtimes, links.
            assert m.health().state is State.READY
            assert read(data / "hello.txt") == "from the pod\n"
            st = os.stat(data / "hello.txt")
            assert stat.S_IMODE(st.st_mode) == 0o640 and int(st.st_mtime) == 1_600_000_000
            assert read(data / "sub" / "nested.txt") == "nested\n"
            assert os.readlink(data / "link") == "sub/nested.txt"
            assert not os.path.lexists(data / "escape")  # a link leading out of the volume is not copied
            assert read(local / "etc" / "cfg" / "token") == "jwt.jwt.jwt"  # through the ..data farm
            assert os.path.islink(local / "etc" / "cfg" / "token")

            # Stage 2: a local edit and a new local file reach the pod.
            (data / "hello.txt").write_text("edited on the laptop\n")
            (data / "sub" / "new.txt").write_text("new here\n")
            await m.settled()
            assert read(served / "hello.txt") == "edited on the laptop\n"
            assert read(served / "sub" / "new.txt") == "new here\n"

            # Stage 3: edits in the pod come back: a changed file, a new directory with a file.
            (served / "sub" / "nested.txt").write_text("changed in the pod, longer\n")
            (served / "made-in-pod").mkdir()
            (served / "made-in-pod" / "f.txt").write_text("pod file\n")
            await m.settled()
            assert read(data / "sub" / "nested.txt") == "changed in the pod, longer\n"
            assert read(data / "made-in-pod" / "f.txt") == "pod file\n"

            # Stage 4: deletions both ways, and a rename (delete + create).
            (data / "sub" / "new.txt").unlink()
            (served / "made-in-pod" / "f.txt").unlink()
            (served / "made-in-pod").rmdir()
            (data / "hello.txt").rename(data / "renamed.txt")
            await m.settled()
            assert not (served / "sub" / "new.txt").exists() and not (data / "made-in-pod").exists()
            assert read(served / "renamed.txt") == "edited on the laptop\n" and not (served / "hello.txt").exists()

            # Stage 5: no echo: what was pushed or pulled is not copied again.
            before = os.stat(served / "renamed.txt").st_mtime_ns
            quiet = await m.sync_once()
            assert [a for a in quiet.actions if a.op != "record"] == []
            assert os.stat(served / "renamed.txt").st_mtime_ns == before

            # Stage 6: an edit made just before stop reaches the pod (the last pass), then the copy stays.
            (data / "last.txt").write_text("just before stop\n")
        finally:
            await m.stop()
            await m.stop()  # safe twice
        assert m.health().state is State.STOPPED
        assert read(served / "last.txt") == "just before stop\n"
        assert (local / MARKER).exists() and read(data / "last.txt") == "just before stop\n"

        # Stage 7: a second run over the kept copy: the pod is the truth (a stale local file goes).
        (data / "stale.txt").write_text("only here, while nothing synced\n")
        (served / "while-away.txt").write_text("made while nobody synced\n")
        async with pod.mount(local):
            assert not (data / "stale.txt").exists()
            assert read(data / "while-away.txt") == "made while nobody synced\n"


async def test_a_non_empty_directory_that_is_no_copy_is_refused_and_a_temp_dir_is_removed(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("do not touch")
    async with Pod(tmp_path) as pod:
        with pytest.raises(UsageError, match="is not empty"):
            await pod.mount(mine).start()
        assert (mine / "important.txt").read_text() == "do not touch"

        m = pod.mount(None)
        async with m:
            assert m.path is not None and read(m.path / "var" / "data" / "hello.txt") == "from the pod\n"
        assert not m.path.exists()


@pytest.mark.parametrize("limit, setting", [({"sync_max_files": 3}, "TPENV_MOUNTS_SYNC_MAX_FILES"),
                                            ({"sync_max_bytes": 5}, "TPENV_MOUNTS_SYNC_MAX_BYTES")])
async def test_volumes_above_the_limits_are_refused_naming_the_setting(tmp_path, limit, setting):
    async with Pod(tmp_path) as pod:
        m = pod.mount(tmp_path / "vol", **limit)
        with pytest.raises(UsageError) as err:
            await m.start()
        assert setting in err.value.hint
        assert not any(p.name != MARKER for p in (tmp_path / "vol").iterdir())


async def test_the_session_ending_fails_the_mount(tmp_path):
    async with Pod(tmp_path) as pod:
        m = pod.mount(tmp_path / "vol")
        async with m:
            pod.session.close()
            await asyncio.wait_for(m.settled(), 10)
            assert m.health().state is State.FAILED and "sftp session" in m.health().last_error
