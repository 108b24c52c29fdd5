"""Sync mode's pure part (tpenv.kits.treesync): two snapshots and their bases → actions.

Stages: one-sided changes; the conflict rule; echo suppression (what we wrote is recorded, so the
next pass is quiet); the first sync (the pod is the truth); directories that must survive; the
local scan on a real directory (symlinks not followed, links leading out skipped).
"""
from __future__ import annotations

import os

from tpenv.kits.treesync import (DIR, Entry, apply_to_base, initial_plan, link_stays_inside, plan, scan_local,
                                 top_roots)

D = Entry.dir(0o755)


def f(size: int = 1, mtime: int = 100, mode: int = 0o644) -> Entry:
    return Entry.file(mode, size, mtime)


def ops(p) -> dict[str, str]:
    return {a.path: a.op for a in p.actions if a.op != "record"}


BASE = {"data": D, "data/a": f(), "data/sub": D, "data/sub/b": f(2)}


# --- stage 1: a change on one side is copied to the other ----------------------------------------------------------

def test_nothing_changed_nothing_to_do():
    assert ops(plan(BASE, BASE, BASE, BASE, ["data"])) == {}


def test_local_write_create_delete_are_pushed():
    local = {**BASE, "data/a": f(5, 200), "data/new": f(3)}
    del local["data/sub/b"]
    assert ops(plan(BASE, BASE, local, BASE, ["data"])) == {
        "data/a": "push", "data/new": "push", "data/sub/b": "delete_remote"}


def test_remote_write_create_delete_are_pulled():
    remote = {**BASE, "data/a": f(5, 200), "data/new": f(3)}
    del remote["data/sub/b"]
    assert ops(plan(BASE, BASE, BASE, remote, ["data"])) == {
        "data/a": "pull", "data/new": "pull", "data/sub/b": "delete_local"}


def test_a_rename_is_a_delete_and_a_create():
    local = {k: v for k, v in BASE.items() if k != "data/a"} | {"data/renamed": f()}
    assert ops(plan(BASE, BASE, local, BASE, ["data"])) == {"data/a": "delete_remote", "data/renamed": "push"}


def test_a_mode_change_is_a_change():
    assert ops(plan(BASE, BASE, {**BASE, "data/a": f(mode=0o755)}, BASE)) == {"data/a": "push"}


# --- stage 2: the conflict rule -------------------------------------------------------------------------------------

def test_changed_on_both_sides_the_local_copy_wins_and_is_named():
    p = plan(BASE, BASE, {**BASE, "data/a": f(7, 300)}, {**BASE, "data/a": f(9, 301)}, ["data"])
    assert ops(p) == {"data/a": "push"} and p.conflicts == ["data/a"]


def test_deleted_on_one_side_changed_on_the_other_the_change_survives():
    local = {k: v for k, v in BASE.items() if k != "data/a"}
    p = plan(BASE, BASE, local, {**BASE, "data/a": f(9, 301)})
    assert ops(p) == {"data/a": "pull"} and p.conflicts == []
    remote = {k: v for k, v in BASE.items() if k != "data/a"}
    assert ops(plan(BASE, BASE, {**BASE, "data/a": f(9, 301)}, remote)) == {"data/a": "push"}


def test_the_same_change_on_both_sides_is_no_conflict():
    both = {k: v for k, v in BASE.items() if k != "data/a"} | {"data/d2": D}
    p = plan(BASE, BASE, both, both)
    assert ops(p) == {} and p.conflicts == []
    assert {a.path for a in p.actions} == {"data/a", "data/d2"}  # recorded in the bases


def test_a_deleted_directory_survives_when_a_changed_file_under_it_comes_back():
    local = {"data": D, "data/a": f()}  # data/sub deleted here
    remote = {**BASE, "data/sub/b": f(8, 400)}  # data/sub/b changed in the pod
    p = plan(BASE, BASE, local, remote, ["data"])
    assert ops(p) == {"data/sub": "pull", "data/sub/b": "pull"}
    order = [a.path for a in p.ordered() if a.op != "record"]
    assert order.index("data/sub") < order.index("data/sub/b")


def test_a_root_is_never_deleted_in_the_pod():
    local = {}  # the user removed the whole local copy of /data
    assert ops(plan(BASE, BASE, local, BASE, ["data"]))["data"] == "pull"


def test_deletions_run_deepest_first_and_directories_before_their_files():
    local = {"data": D, "data/x": D, "data/x/y": f()}
    p = plan(BASE, BASE, local, BASE, ["data"])
    order = [(a.op, a.path) for a in p.ordered() if a.op != "record"]
    assert order.index(("delete_remote", "data/sub/b")) < order.index(("delete_remote", "data/sub"))
    assert order.index(("push", "data/x")) < order.index(("push", "data/x/y"))


# --- stage 3: echo suppression --------------------------------------------------------------------------------------

def test_what_we_pushed_is_not_pulled_back_and_what_we_pulled_is_not_pushed_back():
    base_l, base_r = dict(BASE), dict(BASE)
    local = {**BASE, "data/a": f(5, 200)}
    p = plan(base_l, base_r, local, BASE)
    assert ops(p) == {"data/a": "push"}
    # After the push the pod's copy has its own mtime resolution and stat: recorded as the remote base.
    pushed = f(5, 200)
    apply_to_base(base_l, base_r, "data/a", local["data/a"], pushed)
    remote = {**BASE, "data/a": pushed}
    assert ops(plan(base_l, base_r, local, remote)) == {}

    remote2 = {**remote, "data/c": f(4, 500)}
    assert ops(plan(base_l, base_r, local, remote2)) == {"data/c": "pull"}
    apply_to_base(base_l, base_r, "data/c", f(4, 500), remote2["data/c"])
    local2 = {**local, "data/c": f(4, 500)}
    assert ops(plan(base_l, base_r, local2, remote2)) == {}


def test_a_failed_action_is_tried_again():
    local = {**BASE, "data/a": f(5, 200)}
    assert ops(plan(BASE, BASE, local, BASE)) == {"data/a": "push"}
    # Nothing recorded (the push failed): the same plan next time.
    assert ops(plan(BASE, BASE, local, BASE)) == {"data/a": "push"}


# --- stage 4: the first sync ----------------------------------------------------------------------------------------

def test_first_sync_into_an_empty_directory_pulls_everything():
    p = initial_plan({}, BASE, ["data"])
    assert ops(p) == {k: "pull" for k in BASE}


def test_first_sync_over_a_previous_copy_makes_it_equal_to_the_pod():
    old = {"data": D, "data/a": f(), "data/stale": f(), "data/sub": D, "data/sub/b": f(1, 1)}
    p = initial_plan(old, BASE, ["data"])
    assert ops(p) == {"data/stale": "delete_local", "data/sub/b": "pull"}  # data/a is the same: kept
    assert p.conflicts == []


# --- stage 5: the local scan and roots ------------------------------------------------------------------------------

def test_top_roots_drop_nested_mount_paths():
    assert top_roots(["/data/sub", "/data", "/var/run/x", "/"]) == ["data", "var/run/x"]


def test_link_stays_inside():
    assert link_stays_inside("data/a/l", "../b", "data")
    assert link_stays_inside("data/l", "..data/token", "data")
    assert not link_stays_inside("data/l", "../etc/passwd", "data")
    assert not link_stays_inside("data/l", "/etc/passwd", "data")


def test_scan_local_lists_files_dirs_and_inside_links_only(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a").write_text("x")
    (d / "sub" / "b").write_text("yy")
    os.utime(d / "a", (1000, 1000.7))
    os.symlink("sub/b", d / "inside")
    os.symlink("/etc/passwd", d / "outside")
    os.symlink("../../x", d / "climbs")
    # A chain the lexical check passes ("dot/../x" reads as data/x) but the kernel resolves
    # through dot -> "." to the volume's parent: not pushed either.
    os.symlink(".", d / "dot")
    os.symlink("dot/../x", d / "chain")
    (d / ".tpenv-sync-tmp").write_text("partial")
    skipped: set[str] = set()
    snap = scan_local(tmp_path, ["data", "absent"], skipped)
    assert snap["data"].kind == DIR and snap["data/sub"].kind == DIR
    assert snap["data/a"] == Entry.file(os.stat(d / "a").st_mode, 1, 1000)
    assert snap["data/sub/b"].size == 2
    assert snap["data/inside"] == Entry.link("sub/b")
    assert set(snap) == {"data", "data/sub", "data/a", "data/sub/b", "data/inside", "data/dot"}
    assert skipped == {"data/outside", "data/climbs", "data/chain"}
