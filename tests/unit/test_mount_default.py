"""Mounts by default, not by force (issue #14): a mount nobody asked for is left out where sshfs
is missing, said once; one asked for (flag or file) keeps failing with the MissingTool error."""
import logging

import pytest

from tpenv.cli.main import parse
from tpenv.config import load_config
from tpenv.config.flags import intercept_from_flags
from tpenv.engine import mounts
from tpenv.engine.mounts import skip_default_mount


def from_flags(*argv: str):
    return intercept_from_flags(parse(["intercept", *argv]))  # the one builder the verb uses


# --- stage 1: who asked for a mount: the flags and the file say it, the model remembers ---------------------------

@pytest.mark.parametrize("argv, asked", [
    ((), False),
    (("--mount", "vol"), True),
    (("--mount", "true"), True),
    (("--mount", "false"), True),
    (("--mount-mode", "sync"), True),
])
def test_flags_set_the_mount_only_when_given(argv, asked):
    ic = from_flags("web", *argv)
    assert ("mount" in ic.model_fields_set) is asked
    assert ic.mount.path is not None  # the default is still a mount (true), where it can be made


def test_rewrite_env_asks_for_a_mount():
    ic = from_flags("web", "--rewrite-env", "TOKEN_FILE")
    assert "mount" in ic.model_fields_set and ic.mount.path is True


def test_the_file_sets_the_mount_only_when_written(tmp_path):
    f = tmp_path / "telepresence.yaml"
    f.write_text("intercepts:\n  - workload: a\n    port: 1\n  - workload: b\n    port: 2\n    mount: ./vol\n")
    a, b = load_config(f).intercepts
    assert "mount" not in a.model_fields_set and "mount" in b.model_fields_set


# --- stage 2: the decision, with the real lookup on a PATH without sshfs -------------------------------------------

@pytest.fixture
def no_sshfs(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: the real shutil.which finds nothing
    monkeypatch.setattr(mounts, "_SKIPPED_SAID", set())


def test_a_default_mount_is_skipped_and_said_once(no_sshfs, caplog):
    log = logging.getLogger("tpenv.test")
    with caplog.at_level(logging.WARNING, "tpenv.test"):
        assert skip_default_mount("auto", False, ["/data"], log, key=("intercept", "ns", "web", "80"))
        assert skip_default_mount("auto", False, ["/data"], log, key=("intercept", "ns", "web", "80"))
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1, notes
    assert "(/data) are not mounted: sshfs is not installed" in notes[0]
    assert "apt-get install sshfs" in notes[0] and "--mount-mode sync" in notes[0]


def test_an_explicit_or_chosen_mode_mount_is_never_skipped(no_sshfs, caplog):
    log = logging.getLogger("tpenv.test")
    assert not skip_default_mount("auto", True, ["/data"], log, key=("k",))
    assert not skip_default_mount("sync", False, ["/data"], log, key=("k",))  # sync needs no FUSE
    assert not skip_default_mount("sshfs", False, ["/data"], log, key=("k",))
    assert caplog.records == []
