"""Local child processes that never outlive tpenv and stop with their whole family.

Each process runs in its own session (``start_new_session``: a new process group whose id
is its pid), so a staged stop reaches its children too: SIGINT to the group, wait
``stop_grace``; SIGTERM, wait ``term_grace``; SIGKILL. Waiting is event-driven: a pidfd per
remaining group member, readable when that process exits.

If tpenv itself dies (kill -9), the kernel's parent-death signal kills the process:
``setpriv --pdeathsig KILL`` (util-linux) when present, else ``prctl(PR_SET_PDEATHSIG)``
from a ``preexec_fn``. Limit: the parent-death signal reaches the direct child only; a
grandchild that ignores its parent's death survives a kill -9 of tpenv (a graceful stop
still reaches it through the group).
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from functools import cache

from tpenv.errors import MissingTool, NotFound
from tpenv.kits.aio import unit_logger

PR_SET_PDEATHSIG = 1
KILL_WAIT = 2.0  # after SIGKILL: only the kernel's bookkeeping is left to wait for


@cache
def setpriv_prefix() -> tuple[str, ...]:
    """``setpriv --pdeathsig KILL --`` if this util-linux has it, else ()."""
    path = shutil.which("setpriv")
    if not path:
        return ()
    try:
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return (path, "--pdeathsig", "KILL", "--") if "--pdeathsig" in out else ()


def _preexec_pdeathsig(parent: int) -> Callable[[], None]:
    # Runs in the forked child before exec. preexec_fn is not safe when the parent has other
    # threads (a lock held by another thread at fork time stays locked in the child), so it
    # only makes one raw syscall here, and is used only when setpriv is missing.
    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # tpenv died between fork and prctl: the signal never comes
            os._exit(1)

    return preexec


def dies_with_us() -> tuple[tuple[str, ...], Callable[[], None] | None]:
    """``(argv prefix, preexec_fn)`` for a child that the kernel kills when this process dies:
    ``setpriv --pdeathsig KILL --`` where util-linux has it, else the ``prctl`` preexec."""
    prefix = setpriv_prefix()
    return prefix, (None if prefix else _preexec_pdeathsig(os.getpid()))


def group_members(pgid: int) -> set[int]:
    """Live (non-zombie) pids in process group ``pgid``, from /proc."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(b")") + 2:].split()  # the command name may contain spaces and ')'
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            pids.add(int(entry))
    return pids


async def wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait until every pid has exited (pidfd readable), at most ``timeout``; return the survivors."""
    loop = asyncio.get_running_loop()
    waiting: dict[int, tuple[int, asyncio.Future]] = {}
    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            fut = loop.create_future()
            loop.add_reader(fd, lambda f=fut: f.done() or f.set_result(None))
            waiting[pid] = (fd, fut)
        if waiting:
            await asyncio.wait([f for _, f in waiting.values()], timeout=timeout)
        return {pid for pid, (_, fut) in waiting.items() if not fut.done()}
    finally:
        for fd, _ in waiting.values():
            loop.remove_reader(fd)
            os.close(fd)


def print_sink(prefix: str) -> Callable[[str], None]:
    """Default output: each line on stdout behind the unit's prefix."""
    def sink(line: str) -> None:
        sys.stdout.write(f"{prefix} {line}\n")
        sys.stdout.flush()

    return sink


class ProcessGroup:
    """One child process leading its own process group, its output relayed line by line.

    ``async with ProcessGroup(...) as p`` starts it and stops the whole group on exit.
    ``stop()`` is safe twice; ``kill()`` is the synchronous last resort.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        cwd: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        kind: str = "proc",
        name: str | None = None,
        output: Callable[[str], None] | None = None,
        stop_grace: float = 3.0,
        term_grace: float = 2.0,
    ) -> None:
        self.argv, self.cwd, self.env = list(argv), cwd, env
        self.name = name or os.path.basename(argv[0])
        self.log = unit_logger(kind, self.name)
        self.output = output or print_sink(f"[{kind}/{self.name}]")
        self.stop_grace, self.term_grace = stop_grace, term_grace
        self.proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def _check_program(self) -> None:
        # Through setpriv a missing program would only show as exit code 127; say it plainly.
        if self.cwd is not None and not os.path.isdir(self.cwd):
            raise NotFound(f"working directory {os.fspath(self.cwd)!r} does not exist", hint="check run.cwd")
        prog = self.argv[0]
        path = (self.env or os.environ).get("PATH", os.defpath)
        if "/" in prog:
            found = os.path.join(self.cwd or ".", prog)
            ok = os.path.isfile(found) and os.access(found, os.X_OK)
        else:
            ok = shutil.which(prog, path=path) is not None
        if not ok:
            raise MissingTool(f"cannot run {prog!r}: not found or not executable (cwd {self.cwd or os.getcwd()})",
                              hint="check run.command and run.cwd")

    async def start(self) -> None:
        prefix, preexec = dies_with_us()
        self._check_program()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *prefix, *self.argv,
                cwd=self.cwd, env=dict(self.env) if self.env is not None else None,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except FileNotFoundError as e:
            raise MissingTool(f"cannot run {self.argv[0]!r}: {e.strerror} (cwd {self.cwd or os.getcwd()})",
                              hint="check run.command and run.cwd") from e
        except PermissionError as e:
            raise MissingTool(f"cannot run {self.argv[0]!r}: {e.strerror}", hint="is it executable?") from e
        self.log.debug("started pid %d: %s", self.proc.pid, " ".join(self.argv))
        self._pump = asyncio.create_task(self._relay(self.proc.stdout), name=f"{self.name}/output")

    async def _relay(self, stream: asyncio.StreamReader) -> None:
        # Read chunks, not readline(): a huge line without a newline must not kill the relay.
        buf = b""
        while chunk := await stream.read(65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                self.output(line.decode(errors="replace").rstrip("\r"))
            if len(buf) > 1 << 20:
                self.output(buf.decode(errors="replace"))
                buf = b""
        if buf:
            self.output(buf.decode(errors="replace"))

    async def wait(self) -> int:
        """Wait for the process itself (not its children) to exit; its exit code."""
        assert self.proc is not None, "not started"
        return await self.proc.wait()

    async def stop(self, first: signal.Signals = signal.SIGINT) -> int | None:
        """Staged stop of the whole group: ``first`` (SIGINT), grace, SIGTERM, grace, SIGKILL."""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        stages = ((first, self.stop_grace), (signal.SIGTERM, self.term_grace),
                  (signal.SIGKILL, KILL_WAIT), (signal.SIGKILL, KILL_WAIT))
        for sig, grace in stages:
            members = group_members(pgid)
            if self.proc.returncode is None:
                members.add(self.proc.pid)
            if not members:
                break
            self.log.debug("sending %s to group %d (%d left)", sig.name, pgid, len(members))
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            if await wait_gone(members, grace):
                if sig is signal.SIGKILL:
                    self.log.warning("processes of group %d survive SIGKILL", pgid)
                continue
        code = await self.proc.wait()
        if self._pump is not None:
            # The pipe closes when the last member exits; do not hang on a stray holder.
            done, _ = await asyncio.wait({self._pump}, timeout=1.0)
            if not done:
                self._pump.cancel()
                await asyncio.wait({self._pump})
        return code

    def kill(self) -> None:
        """SIGKILL the whole group now (second Ctrl-C); synchronous and quiet."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    close = stop

    async def wait_closed(self) -> None:
        if self.proc is not None:
            await self.proc.wait()

    async def __aenter__(self) -> ProcessGroup:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
