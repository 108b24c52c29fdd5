"""The handler unit: the local process serving an intercept (``run:``), supervised by tpenv.

It heals itself: on exit it restarts per its policy (on-failure / always / never) with
backoff; on a save of a watched file it restarts at once with a fresh env. The reconciler
only starts it, stops it, and restarts it when its spec changes. Status changes are
reported with ``unit_changed`` so ``tpenv status`` and the reconciler's waiters see them.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tpenv.engine.units import Key, Notify, State, UnitEvent, UnitState, hash_spec
from tpenv.engine.watcher import FileWatcher
from tpenv.kits.aio import Backoff, NamedTask, unit_logger
from tpenv.kits.procs import ProcessGroup
from tpenv.settings import HandlerSettings, Settings

_H = HandlerSettings()  # the documented defaults: one source for a spec built without settings

EnvFn = Callable[[], "Mapping[str, str] | Awaitable[Mapping[str, str]]"]
Policy = Literal["on-failure", "always", "never"]


def _no_env() -> Mapping[str, str]:
    return {}


@dataclass(frozen=True)
class HandlerSpec:
    """A desired handler. ``env()`` is called at every (re)start and its variables are laid
    over tpenv's own environment; ``env_version`` is whatever about the env should restart the
    handler when it changes (e.g. the intercept's env hash), part of ``spec_hash``."""

    name: str
    argv: tuple[str, ...]
    cwd: Path
    restart: Policy = "on-failure"
    watch: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    # Paths the watcher never enters: tpenv's own outputs (the mount directory, the env file).
    exclude: tuple[str, ...] = ()
    restart_signal: str = "SIGTERM"  # sent first when a saved file restarts the process
    env: EnvFn = field(default=_no_env, compare=False)
    env_version: str = ""
    depends_on: frozenset[Key] = frozenset()
    stop_grace: float = _H.stop_grace
    term_grace: float = _H.term_grace
    restart_initial: float = _H.restart_initial
    restart_max: float = _H.restart_max
    debounce: float = _H.debounce
    healthy_after: float = 10.0
    output: Callable[[str], None] | None = field(default=None, compare=False)
    # argv -> the argv actually started, asked at every (re)start: connect's ns mode runs the
    # handler in its own namespaces (outbound/nsmode.py). None: argv as is.
    wrap: Callable[[list[str]], list[str]] | None = field(default=None, compare=False)

    @property
    def key(self) -> Key:
        return ("handler", self.name)

    @property
    def spec_hash(self) -> str:
        return hash_spec(list(self.argv), str(self.cwd), self.restart, list(self.watch), list(self.ignore),
                         self.env_version, list(self.exclude), self.restart_signal)

    def create(self, notify: Notify) -> HandlerUnit:
        return HandlerUnit(self, notify)

    @classmethod
    def from_run(cls, name: str, run: Any, base: Path, settings: Settings, **kw: Any) -> HandlerSpec:
        """From a config ``RunSpec`` (command, cwd, watch, ignore, restart); ``cwd`` is relative
        to ``base`` (the config file's directory); ``settings``: tpenv.settings.Settings."""
        argv = run.argv() if hasattr(run, "argv") else (["sh", "-c", run.command] if isinstance(run.command, str)
                                                        else list(run.command))
        h = settings.handlers
        kw = dict(stop_grace=h.stop_grace, term_grace=h.term_grace, restart_initial=h.restart_initial,
                  restart_max=h.restart_max, debounce=h.debounce) | kw
        return cls(name=name, argv=tuple(argv), cwd=(base / run.cwd).resolve(), restart=run.restart,
                   watch=tuple(run.watch), ignore=tuple(run.ignore),
                   restart_signal=getattr(run, "restart_signal", "SIGTERM"), **kw)


class HandlerUnit:
    """One supervised handler: a process group, an optional file watcher, a supervisor task."""

    def __init__(self, spec: HandlerSpec, notify: Notify) -> None:
        self.spec, self._notify = spec, notify
        self.key, self.spec_hash, self.depends_on = spec.key, spec.spec_hash, spec.depends_on
        self.log = unit_logger("handler", spec.name)
        self.state = UnitState()
        self.proc: ProcessGroup | None = None
        self.backoff = Backoff(spec.restart_initial, spec.restart_max, healthy_after=spec.healthy_after)
        self._changed = asyncio.Event()  # a watched file changed
        self._changed_paths: set[str] = set()
        self._watcher: FileWatcher | None = None
        self._task: NamedTask | None = None
        self._restarts = 0

    # -- the Unit contract --------------------------------------------------------------

    async def start(self) -> None:
        self._set(State.STARTING)
        if self.spec.watch:
            self._watcher = FileWatcher(self.spec.cwd, self.spec.watch, self.spec.ignore,
                                        on_change=self._on_files, debounce=self.spec.debounce,
                                        name=self.spec.name, exclude=self.spec.exclude)
            await self._watcher.start()
        await self._spawn()  # a missing program fails start(): the reconciler says so and retries
        self._task = NamedTask("handler", self.spec.name, self._supervise, logger=self.log,
                               stop_grace=self.spec.stop_grace + self.spec.term_grace + 10.0)

    async def stop(self) -> None:
        if self.state.state is not State.STOPPED:
            self._set(State.STOPPING)
        if self._watcher is not None:
            await self._watcher.stop()
        if self._task is not None:
            await self._task.stop()
        if self.proc is not None:  # start() failed half-way, or the supervisor was cancelled
            await self.proc.stop()
        self._set(State.STOPPED)

    def abort(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def health(self) -> UnitState:
        self.state.restarts = self._restarts
        return self.state

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- internals ------------------------------------------------------------------------

    def _set(self, state: State, *, error: str | None = None, detail: str | None = None) -> None:
        self.state.set(state, error=error, detail=detail)
        self._notify(UnitEvent("unit_changed", self.key, detail=state.value))

    def _on_files(self, paths: set[str]) -> None:
        self._changed_paths |= paths
        self._changed.set()

    async def _fresh_env(self) -> dict[str, str]:
        extra = self.spec.env()
        if inspect.isawaitable(extra):
            extra = await extra
        return {**os.environ, **extra}

    async def _spawn(self) -> None:
        argv = list(self.spec.argv)
        if self.spec.wrap is not None:
            argv = self.spec.wrap(argv)
        self.proc = ProcessGroup(argv, cwd=self.spec.cwd, env=await self._fresh_env(),
                                 kind="handler", name=self.spec.name, output=self.spec.output,
                                 stop_grace=self.spec.stop_grace, term_grace=self.spec.term_grace)
        await self.proc.start()
        self.backoff.started()
        self.log.info("running (pid %d): %s", self.proc.pid, " ".join(self.spec.argv))
        self._set(State.READY, detail=f"pid {self.proc.pid}")

    async def _wait_any(self, stopping: asyncio.Event, timeout: float | None = None,
                        exited: Awaitable[int] | None = None) -> str:
        """Wait for the first of: stop requested, files changed, process exited, timeout."""
        waits = {asyncio.ensure_future(stopping.wait()): "stop",
                 asyncio.ensure_future(self._changed.wait()): "files"}
        if exited is not None:
            waits[asyncio.ensure_future(exited)] = "exit"
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        for w in waits:  # a stop wins over anything that happened at the same time
            if w in done and waits[w] == "stop":
                return "stop"
        return next((waits[w] for w in done), "timeout")

    async def _supervise(self, stopping: asyncio.Event) -> None:
        try:
            while True:
                assert self.proc is not None
                why = await self._wait_any(stopping, exited=self.proc.wait())
                if why == "stop":
                    return
                if why == "files":
                    await self._restart_for_files(stopping)
                else:
                    code = await self.proc.stop()  # its children may still hold the port
                    failed = code != 0
                    await self._follow_policy(stopping, code, self.spec.restart,
                                              error=f"exited with code {code}" if failed else None)
                if stopping.is_set() or self.proc is None:
                    return
        finally:
            if self.proc is not None:
                await self.proc.stop()

    async def _restart_for_files(self, stopping: asyncio.Event) -> None:
        paths = sorted(self._changed_paths)
        self._changed_paths.clear()
        self._changed.clear()
        self.log.info("changed: %s; restarting", ", ".join(paths[:5]) + (" ..." if len(paths) > 5 else ""))
        self._set(State.STARTING, detail="files changed")
        assert self.proc is not None
        # Not SIGINT by default: Python would print a KeyboardInterrupt traceback at every save.
        await self.proc.stop(signal.Signals[self.spec.restart_signal])
        self.backoff.reset()  # a save is a fresh start, not a crash loop
        try:
            await self._respawn()
        except Exception as e:
            await self._follow_policy(stopping, None, "always", error=str(e))

    async def _respawn(self) -> None:
        self._restarts += 1
        try:
            await self._spawn()
        except Exception as e:  # e.g. the program was deleted meanwhile
            self.proc = None
            self.log.error("cannot start: %s", e)
            raise

    async def _follow_policy(self, stopping: asyncio.Event, code: int | None, policy: Policy,
                             error: str | None) -> None:
        """After an exit (or a failed spawn): wait as the restart policy says, then respawn.
        Returns with a new process running, or with ``stopping`` set."""
        while True:
            failed = error is not None
            if policy == "never" or (policy == "on-failure" and not failed):
                self.log.info("exited with code %s; not restarting (restart: %s)", code, policy)
                self._set(State.FAILED if failed else State.STOPPED, error=error,
                          detail="waiting for a file change" if self.spec.watch else None)
                why = await self._wait_any(stopping)
            else:
                delay = self.backoff.failed()
                self.log.warning("%s; restarting in %.1fs", error or f"exited with code {code}", delay)
                self._set(State.FAILED, error=error, detail=f"restarting in {delay:.1f}s")
                why = await self._wait_any(stopping, timeout=delay)
            if why == "stop":
                return
            if why == "files":
                self._changed_paths.clear()
                self._changed.clear()
                self.backoff.reset()
            try:
                await self._respawn()
                return
            except Exception as e:
                code, error, policy = None, str(e), "always"  # retry the spawn itself with backoff
