"""Issue 12: the SFTP root holds. Attacks tried for real against a real sidecar process.

The agent's own files sit beside the mounts root (``auth/host_key`` is the SSH host key, as in
the pod); every way out is tried: an absolute symlink planted in a volume, a chain of links the
client makes itself (each one harmless alone), ``..``, ``/proc/self/root``, a rename or a hard
link aimed outside. The volume's own files stay readable and writable, relative links inside
it still work.
"""
from __future__ import annotations

import errno
import os

import asyncssh
import pytest

from agent_testkit import App, RawSession, auth_material, run_agent



async def refused(coro) -> asyncssh.SFTPError:
    with pytest.raises((asyncssh.SFTPPermissionDenied, asyncssh.SFTPNoSuchFile, asyncssh.SFTPFailure)) as e:
        await coro
    return e.value


async def test_no_path_leads_out_of_the_mounts(tmp_path):
    # Stage 1: a volume with a file, a relative link inside it, and two planted absolute links
    # (what an app or an image could leave there): to the agent's host key and to /proc/self/root.
    m = auth_material()
    data = tmp_path / "mounts" / "var" / "data"
    data.mkdir(parents=True)
    (data / "hello.txt").write_text("from the pod")
    os.symlink("hello.txt", data / "inside")
    host_key = tmp_path / "auth" / "host_key"
    os.symlink(str(host_key), data / "planted")
    os.symlink("/proc/self/root", data / "procroot")
    async with App("app") as app, run_agent(tmp_path, m, [f"0:{app.port}:http"],
                                            extra=["--mount", "/var/data"]) as agent:
        secret = host_key.read_bytes()
        async with RawSession(agent, m, "s1") as s, s.conn.start_sftp_client() as sftp:
            # Stage 2: the planted absolute link, read, stat'ed and written through: refused.
            e = await refused(sftp.open("/var/data/planted"))
            assert "outside" in str(e)
            # stat of a link leading out describes the link itself, never its target.
            assert (await sftp.stat("/var/data/planted")).type == asyncssh.FILEXFER_TYPE_SYMLINK
            await refused(sftp.open("/var/data/planted", "w"))
            # Stage 3: /proc/self/root through the planted link and spelled out: refused.
            await refused(sftp.open("/var/data/procroot" + str(host_key)))
            await refused(sftp.listdir("/var/data/procroot/"))
            await refused(sftp.open("/proc/self/root" + str(host_key)))
            # Stage 4: `..` spelled in the path.
            rel_to_auth = "/../auth/host_key"
            await refused(sftp.open(rel_to_auth))
            await refused(sftp.open("/var/data/../../../auth/host_key"))
            await refused(sftp.listdir("/.."))
            # Stage 5: a chain the client builds itself: each link is allowed when made, and
            # following the chain out is refused (relative climb, then absolute).
            await sftp.symlink("..", "/var/data/up1")
            await sftp.symlink("up1/..", "/var/data/up2")
            await sftp.symlink("up2/..", "/var/data/up3")
            await refused(sftp.open("/var/data/up3/auth/host_key"))
            await sftp.symlink(str(tmp_path), "/var/data/abs")
            await refused(sftp.open("/var/data/abs/auth/host_key"))
            await refused(sftp.listdir("/var/data/abs"))
            # Stage 6: renames and hard links aimed outside, and a create through a dangling
            # absolute link: refused, nothing written outside.
            await refused(sftp.rename("/var/data/hello.txt", "/../escaped"))
            await refused(sftp.link("/../auth/host_key", "/var/data/hard"))
            await sftp.symlink(str(tmp_path / "created-outside"), "/var/data/dangling")
            await refused(sftp.open("/var/data/dangling", "w"))
            # Stage 7: the volume's own files: read, write, a relative link inside, realpath.
            async with sftp.open("/var/data/hello.txt") as f:
                assert await f.read() == "from the pod"
            async with sftp.open("/var/data/inside") as f:
                assert await f.read() == "from the pod"
            async with sftp.open("/var/data/new.txt", "w") as f:
                await f.write("from the laptop")
            assert await sftp.realpath("/var/data/inside") == "/var/data/hello.txt"
            assert await sftp.realpath("/var/data/up1") == "/var"
            assert set(await sftp.listdir("/var/data")) >= {"hello.txt", "new.txt", "planted", "up3"}
            await sftp.chmod("/var/data/new.txt", 0o640)
            await sftp.rename("/var/data/new.txt", "/var/data/renamed.txt")
    # Stage 8: the host key unchanged, nothing created outside, the write landed in the volume.
    assert host_key.read_bytes() == secret
    assert not (tmp_path / "created-outside").exists() and not (tmp_path / "escaped").exists()
    assert (data / "renamed.txt").read_text() == "from the laptop"
    assert (data / "renamed.txt").stat().st_mode & 0o777 == 0o640


def test_without_openat2_every_symlink_and_climb_is_refused(tmp_path, monkeypatch):
    # The fallback walk (kernels before 5.6, seccomp without openat2) is stricter, never looser.
    from tpenv_agent import confined
    monkeypatch.setattr(confined, "HAVE_OPENAT2", False)
    (tmp_path / "root" / "d").mkdir(parents=True)
    (tmp_path / "root" / "d" / "f").write_text("x")
    (tmp_path / "secret").write_text("s")
    os.symlink(str(tmp_path / "secret"), tmp_path / "root" / "abs")
    os.symlink("d", tmp_path / "root" / "rel")
    root = confined.Root(tmp_path / "root")
    try:
        fd = root.open("/d/f", os.O_RDONLY)
        assert os.read(fd, 10) == b"x"
        os.close(fd)
        for path in ("/abs", "/rel/f", "/../secret", "d/../../secret"):
            with pytest.raises(confined.Escape) as e:
                root.open(path, os.O_RDONLY)
            assert e.value.errno == errno.EACCES
        os.close(root.open("/abs", os.O_PATH | os.O_NOFOLLOW))  # lstat of a link is fine
    finally:
        root.close()
        root.close()
