"""Two-way sync of two directory trees, the pure part: snapshots, the three-way plan, the rules.

A *snapshot* maps a relative POSIX path (``data/a/b.txt``) to an :class:`Entry` (a file, a
directory or a symlink, with what tells a change: size, mtime in whole seconds, permission
bits, link target). Each side keeps a *base*: its snapshot as of the last sync. A path changed
on a side when its entry differs from that side's base, so nothing is compared across sides
(the two clocks and mtime resolutions never meet) and what we wrote ourselves is recorded in
the base at once: it is never seen again as a change (no echo).

The rules, per path (docs/config.md, ``mount.mode``):

- changed on one side only: that side's state is copied to the other (a deletion deletes);
- changed on both to the same thing (both deleted, both made the same directory): nothing;
- changed on both, one a deletion: the changed copy survives (it is copied back);
- changed on both otherwise (a *conflict*): the local copy wins; a warning names the path;
- a directory deleted on one side while something under it changed on the other survives;
- a root (the top of a mounted volume) is never deleted: missing locally, it comes back.

Renames are a deletion and a creation. mtimes are compared in whole seconds (SFTP v3), so a
change within the same second that keeps the size is seen only at the next change.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Iterable, Literal

FILE, DIR, LINK = "f", "d", "l"
# Names this machinery creates for itself (partial transfers, the marker): never synced.
TEMP_PREFIX = ".tpenv-sync-"

Op = Literal["push", "pull", "delete_remote", "delete_local", "record"]


@dataclass(frozen=True)
class Entry:
    """What matters of one path for telling changes: a directory's mtime and size do not."""

    kind: str
    mode: int = 0
    size: int = 0
    mtime: int = 0
    target: str = ""

    @classmethod
    def file(cls, mode: int, size: int, mtime: float) -> "Entry":
        return cls(FILE, mode & 0o7777, size, int(mtime))

    @classmethod
    def dir(cls, mode: int) -> "Entry":
        return cls(DIR, mode & 0o7777)

    @classmethod
    def link(cls, target: str) -> "Entry":
        return cls(LINK, target=target)


@dataclass(frozen=True)
class Action:
    op: Op
    path: str
    local: Entry | None = None   # the local entry as scanned (what a push copies)
    remote: Entry | None = None  # the remote entry as scanned (what a pull copies)
    conflict: bool = False       # changed on both sides: the local copy won


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)

    @property
    def conflicts(self) -> list[str]:
        return [a.path for a in self.actions if a.conflict]

    def ordered(self) -> list[Action]:
        """Deletions deepest first (a directory after its contents), then directories shallowest
        first, then files and links: every write finds its parent directory in place."""
        deletes = sorted((a for a in self.actions if a.op.startswith("delete")), key=lambda a: -a.path.count("/"))
        records = [a for a in self.actions if a.op == "record"]
        writes = [a for a in self.actions if a.op in ("push", "pull")]

        def is_dir(a: Action) -> bool:
            e = a.local if a.op == "push" else a.remote
            return e is not None and e.kind == DIR

        dirs = sorted((a for a in writes if is_dir(a)), key=lambda a: a.path.count("/"))
        rest = [a for a in writes if not is_dir(a)]
        return records + deletes + dirs + rest


def _under(path: str, parent: str) -> bool:
    return path.startswith(parent + "/")


def plan(base_local: dict[str, Entry], base_remote: dict[str, Entry], local: dict[str, Entry],
         remote: dict[str, Entry], roots: Iterable[str] = ()) -> Plan:
    """The actions that bring both sides in step (module docstring for the rules)."""
    roots = set(roots)
    actions: dict[str, Action] = {}
    for p in sorted(set(base_local) | set(base_remote) | set(local) | set(remote)):
        l0, r0, l, r = base_local.get(p), base_remote.get(p), local.get(p), remote.get(p)
        lc, rc = l != l0, r != r0
        if not lc and not rc:
            if p in roots and l is None and r is not None:
                actions[p] = Action("pull", p, l, r)  # a root deleted long ago: back
            continue
        if lc and not rc:
            op: Op = "push" if l is not None else ("delete_remote" if r is not None else "record")
        elif rc and not lc:
            op = "pull" if r is not None else ("delete_local" if l is not None else "record")
        elif l == r:
            op = "record"  # the same change on both sides (both deleted, the same directory made)
        elif l is None:
            op = "pull"  # deleted here, changed there: the changed copy survives
        elif r is None:
            op = "push"
        elif l.kind == DIR and r.kind == DIR:
            op = "push"  # only the permission bits differ: no content is lost either way
        else:
            actions[p] = Action("push", p, l, r, conflict=True)
            continue
        if p in roots and op == "delete_remote":
            op = "pull"
        elif p in roots and op == "delete_local":
            op = "record"  # the volume's top went away in the pod: keep the copy, stop syncing it
        actions[p] = Action(op, p, l, r)
    _keep_needed_dirs(actions)
    return Plan(list(actions.values()))


def _keep_needed_dirs(actions: dict[str, Action]) -> None:
    """A directory deleted on one side while a changed file under it is copied back to that
    side (the changed copy survives) survives too: its deletion becomes a copy back."""
    for p, a in list(actions.items()):
        if a.op == "delete_remote" and a.remote is not None and a.remote.kind == DIR:
            if any(_under(q, p) and b.op == "pull" for q, b in actions.items()):
                actions[p] = Action("pull", p, a.local, a.remote)
        elif a.op == "delete_local" and a.local is not None and a.local.kind == DIR:
            if any(_under(q, p) and b.op == "push" for q, b in actions.items()):
                actions[p] = Action("push", p, a.local, a.remote)


def initial_plan(local: dict[str, Entry], remote: dict[str, Entry], roots: Iterable[str] = ()) -> Plan:
    """The first sync: the pod's copy is the truth. What the local copy (of a previous run)
    has the same stays, what differs is pulled, what the pod no longer has is deleted here."""
    return plan(local, dict(local), local, remote, roots)


def apply_to_base(base_local: dict[str, Entry], base_remote: dict[str, Entry], path: str,
                  local_after: Entry | None, remote_after: Entry | None) -> None:
    """Record what both sides hold now for ``path`` (after an action was carried out)."""
    for base, value in ((base_local, local_after), (base_remote, remote_after)):
        if value is None:
            base.pop(path, None)
        else:
            base[path] = value


# --- the local side -------------------------------------------------------------------------------


def local_entry(path: str | os.PathLike[str]) -> Entry | None:
    """The entry of a local path (not following a symlink), None when it is not there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return entry_of_stat(st, lambda: os.readlink(path))


def entry_of_stat(st: os.stat_result, readlink) -> Entry | None:
    if stat.S_ISDIR(st.st_mode):
        return Entry.dir(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        return Entry.file(st.st_mode, st.st_size, st.st_mtime)
    if stat.S_ISLNK(st.st_mode):
        return Entry.link(readlink())
    return None  # sockets, fifos, devices: not synced


def link_stays_inside(path: str, target: str, root: str) -> bool:
    """A relative link target that, resolved from ``path``'s directory, stays under ``root``
    (all three relative POSIX paths; ``path`` under ``root``)."""
    if not target or target.startswith("/"):
        return False
    resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
    return resolved == root or resolved.startswith(root + "/")


def resolves_inside(path: str, top: str) -> bool:
    """What the kernel makes of a link at ``path`` stays under ``top``: the lexical check above
    misses a chain (``a -> b/../x`` where ``b`` is itself a link to ``.``), which the agent's
    SFTP server would refuse anyway; refusing here says so once instead of failing each pass."""
    real_top = os.path.realpath(top)
    real = os.path.realpath(path)
    return real == real_top or real.startswith(real_top.rstrip("/") + "/")


def scan_local(base_dir: str | os.PathLike[str], roots: Iterable[str],
               skipped: set[str] | None = None) -> dict[str, Entry]:
    """Snapshot of ``base_dir/root`` for every root, symlinks not followed. Symlinks leading
    out of their root and special files are left out (their paths added to ``skipped``)."""
    out: dict[str, Entry] = {}
    base = os.fspath(base_dir)
    for root in roots:
        top = os.path.join(base, root)
        e = local_entry(top)
        if e is None or e.kind != DIR:
            continue
        out[root] = e
        stack = [root]
        while stack:
            rel_dir = stack.pop()
            try:
                it = os.scandir(os.path.join(base, rel_dir))
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for d in it:
                    if d.name.startswith(TEMP_PREFIX):
                        continue
                    rel = f"{rel_dir}/{d.name}"
                    try:
                        st = d.stat(follow_symlinks=False)
                        entry = entry_of_stat(st, lambda: os.readlink(d.path))
                    except FileNotFoundError:
                        continue  # gone while we looked
                    if entry is None or (entry.kind == LINK and not (
                            link_stays_inside(rel, entry.target, root) and resolves_inside(d.path, top))):
                        if skipped is not None:
                            skipped.add(rel)
                        continue
                    out[rel] = entry
                    if entry.kind == DIR:
                        stack.append(rel)
    return out


def top_roots(mount_paths: Iterable[str]) -> list[str]:
    """The app's mount paths as relative roots, nested ones dropped (their parent covers them):
    ``["/data", "/data/sub", "/var/run/x"]`` → ``["data", "var/run/x"]``."""
    rels = sorted({p.strip("/") for p in mount_paths if p.strip("/")})
    out: list[str] = []
    for r in rels:
        if not any(r == o or _under(r, o) for o in out):
            out.append(r)
    return out


__all__ = ["Entry", "Action", "Plan", "plan", "initial_plan", "apply_to_base", "scan_local", "local_entry",
           "entry_of_stat", "link_stays_inside", "top_roots", "TEMP_PREFIX", "FILE", "DIR", "LINK"]
