"""The kernel read-ahead of an sshfs mount (issue 13, docs/performance.md "the SFTP mount rows"): found
from mountinfo without touching the mount, raised where tpenv may write it, left alone (and said
why) where it may not."""
import os
from pathlib import Path

from tpenv.kits.mounttable import mount_device
from tpenv.kits.sshfs import raise_read_ahead

MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw
96 22 0:52 / /tmp/my\\040mount rw,nosuid,nodev,relatime shared:40 - fuse.sshfs tpenv-agent:/ rw,user_id=0
97 22 0:53 / /tmp/other rw,relatime shared:41 - fuse.sshfs tpenv-agent:/ rw,user_id=0
98 96 0:60 / /tmp/my\\040mount rw,relatime shared:42 - fuse.sshfs tpenv-agent:/ rw,user_id=0
"""


def test_the_device_comes_from_mountinfo_with_the_top_mount_winning(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert mount_device("/tmp/my mount", str(info)) == "0:60"  # stacked: the later mount is the one reached
    assert mount_device("/tmp/other", str(info)) == "0:53"
    assert mount_device("/tmp/none", str(info)) is None


def test_the_device_of_a_real_mount_is_what_stat_says():
    # Stage 1: this process's own root, whose stat is safe (not a FUSE mount).
    dev = os.stat("/proc").st_dev
    assert mount_device("/proc") == f"{os.major(dev)}:{os.minor(dev)}"


def _bdi(root: Path, device: str, value: str) -> Path:
    (root / device).mkdir(parents=True)
    (root / device / "read_ahead_kb").write_text(value + "\n")
    return root / device / "read_ahead_kb"


def test_raised_when_writable(tmp_path):
    f = _bdi(tmp_path, "0:52", "128")
    before, why = raise_read_ahead("0:52", 4096, root=tmp_path)
    assert before == 128 and f.read_text() == "4096" and why == "128 -> 4096 KiB"


def test_never_lowered(tmp_path):
    f = _bdi(tmp_path, "0:52", "8192")
    assert raise_read_ahead("0:52", 4096, root=tmp_path) == (None, "already 8192 KiB")
    assert f.read_text().strip() == "8192"


def test_not_writable_changes_nothing_and_says_why(tmp_path):
    # Stage 1: a file even root cannot write (a sysctl of mode 0444), standing in for sysfs as a user.
    (tmp_path / "0:52").mkdir()
    (tmp_path / "0:52" / "read_ahead_kb").symlink_to("/proc/sys/kernel/ngroups_max")
    before, why = raise_read_ahead("0:52", 1 << 30, root=tmp_path)
    # Stage 2: nothing changed, and the reason names the file.
    assert before is None and "not writable" in why and "read_ahead_kb" in why
    assert int(Path("/proc/sys/kernel/ngroups_max").read_text()) < 1 << 30


def test_a_missing_device_is_said_not_raised(tmp_path):
    before, why = raise_read_ahead("0:99", 4096, root=tmp_path)
    assert before is None and "unreadable" in why

