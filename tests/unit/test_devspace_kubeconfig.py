"""Which cluster `devspace.py test|demo|bench` talk to: KUBECONFIG as given, else the local one."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class FakeClusterCli:
    """tests/cluster/cli.py as devspace.py uses it: ``main(["up"])`` and where its kubeconfig is."""

    def __init__(self, state: Path, rc: int = 0) -> None:
        self.path = state / "kubeconfig"
        self.calls: list[list[str]] = []
        self.rc = rc

    def kubeconfig_path(self) -> Path:
        return self.path

    def main(self, argv: list[str]) -> int:
        self.calls.append(argv)
        return self.rc


@pytest.fixture
def devspace(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("devspace_under_test", ROOT / "devspace.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fake = FakeClusterCli(tmp_path / "cluster")
    monkeypatch.setattr(mod, "_cluster_module", lambda: fake)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    return mod, fake


def test_without_kubeconfig_the_local_cluster_is_brought_up_and_used(devspace):
    mod, fake = devspace
    env = mod._cluster_env()
    assert fake.calls == [["up"]] and env["KUBECONFIG"] == str(fake.path)


def test_kubeconfig_naming_the_local_clusters_file_brings_it_up_too(devspace, monkeypatch):
    # What `cluster up` tells you to export; after a `cluster down` the file may still be gone.
    mod, fake = devspace
    monkeypatch.setenv("KUBECONFIG", str(fake.path))
    env = mod._cluster_env()
    assert fake.calls == [["up"]] and env["KUBECONFIG"] == str(fake.path)


def test_kubeconfig_of_another_cluster_is_used_as_given(devspace, monkeypatch, tmp_path):
    mod, fake = devspace
    other = tmp_path / "theirs.yaml"
    other.write_text("apiVersion: v1\nkind: Config\n")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing.yaml'}:{other}")
    assert mod._cluster_env()["KUBECONFIG"] == f"{tmp_path / 'missing.yaml'}:{other}"
    assert fake.calls == []


def test_kubeconfig_naming_no_file_is_a_clear_error_before_anything_runs(devspace, monkeypatch, tmp_path):
    mod, fake = devspace
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "gone" / "kubeconfig"))
    with pytest.raises(SystemExit) as e:
        mod._cluster_env()
    assert "names no file that exists" in str(e.value) and str(tmp_path / "gone") in str(e.value)
    assert "Unset it" in str(e.value)
    assert fake.calls == []


def test_a_local_cluster_that_does_not_come_up_stops_with_its_exit_code(devspace):
    mod, fake = devspace
    fake.rc = 3
    with pytest.raises(SystemExit) as e:
        mod._cluster_env()
    assert "did not come up (exit 3)" in str(e.value)
