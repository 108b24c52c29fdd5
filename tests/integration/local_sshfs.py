"""A real sshfs mount with no cluster: ``sshfs -o passive`` piped to OpenSSH's ``sftp-server``.

The same FUSE code path as a tpenv mount (sshfs speaking SFTP on its stdin/stdout), so a test
can make a mount stuck (SIGSTOP of sshfs) and check that nothing in tpenv waits on it.
Needs sshfs, fuse3 and openssh-sftp-server (devspace.py TEST_PACKAGES installs them).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def need_sshfs() -> str:
    sshfs = shutil.which("sshfs")
    if not sshfs or not os.path.exists(SFTP_SERVER) or not os.path.exists("/dev/fuse"):
        pytest.fail("needs sshfs, fuse3, openssh-sftp-server and /dev/fuse: "
                    "python3 devspace.py test installs them (apt-get install sshfs fuse3 openssh-sftp-server)")
    return sshfs


def mounted(path: str | Path) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


class LocalSshfs:
    """``remote`` (a local directory) mounted at ``mountpoint`` through sshfs; ``close()`` unmounts."""

    def __init__(self, remote: Path, mountpoint: Path) -> None:
        self.remote, self.mountpoint = remote, mountpoint
        self.sftp: subprocess.Popen | None = None
        self.sshfs: subprocess.Popen | None = None

    async def start(self, timeout: float = 20.0) -> "LocalSshfs":
        sshfs = need_sshfs()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.sftp = subprocess.Popen([SFTP_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.sshfs = subprocess.Popen([sshfs, "-f", "-o", "passive", f"local:{self.remote}", str(self.mountpoint)],
                                      stdin=self.sftp.stdout, stdout=self.sftp.stdin)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not mounted(self.mountpoint):  # test setup only: the product waits on mountinfo events
            assert self.sshfs.poll() is None, f"sshfs exited ({self.sshfs.returncode})"
            assert loop.time() < deadline, f"sshfs did not mount {self.mountpoint} within {timeout}s"
            await asyncio.sleep(0.05)
        return self

    def close(self) -> None:
        if mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], timeout=30, check=False)
        for p in (self.sshfs, self.sftp):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
