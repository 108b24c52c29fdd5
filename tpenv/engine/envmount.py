"""The ``("intercept", ns, workload, port)`` unit: an intercept's env and volumes, through one replica's agent.

It reads the app's env (the agent's view, plus the app process's own, appenv.py) and its mounts over
the tunnel session of one ready pod (tunnels.py), mounts the volumes (mounts.py), renders the env
(``tpenv.config.env``) and writes the env files. intercepts.py places it in the desired set.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpenv import logs
from tpenv.config.env import render_env, write_env_file
from tpenv.config.models import Intercept
from tpenv.engine.tunnels import TunnelRegistry
from tpenv.engine.units import Key, Notify, State, UnitState, hash_spec
from tpenv.kits.aio import unit_logger
from tpenv.settings import Settings


def intercept_key(namespace: str, workload: str, port: Any, context: str | None = None) -> Key:
    """``("intercept", ns, workload, port)``, plus the context's name in a file with ``contexts:``
    (the same workload in two clusters is two units)."""
    key: Key = ("intercept", namespace, workload, str(port))
    return (*key, context) if context else key


@dataclass(frozen=True)
class EnvMountSpec:
    """Desired: the env (and mount) of one intercept, read from ``pod``'s agent."""

    # What it asks for (compared: a change restarts the unit)...
    namespace: str
    workload: str
    pod: str
    intercept_id: str
    container: str
    base_dir: Path = Path(".")
    env_json: str | None = None  # an extra JSON env file (--env-json)
    # ...and what it works with (not compared; the intercept counts through spec_hash).
    registry: TunnelRegistry = field(compare=False, repr=False, kw_only=True)
    intercept: Intercept = field(compare=False, repr=False, kw_only=True)
    settings: Settings = field(default_factory=Settings, compare=False, repr=False)
    kube: Any = field(default=None, compare=False, repr=False)  # to read the app process's env (appenv.py)
    # What was already said about an unreadable app env: once per intercept, not per pod.
    said: set[str] = field(default_factory=set, compare=False, repr=False)

    @property
    def key(self) -> Key:
        return intercept_key(self.namespace, self.workload, self.intercept.port)

    @property
    def tunnel_key(self) -> Key:
        return ("tunnel", self.namespace, self.pod)

    @property
    def spec_hash(self) -> str:
        return hash_spec(self.pod, self.intercept.model_dump(mode="json"), self.env_json)

    @property
    def depends_on(self) -> frozenset[Key]:
        return frozenset({self.tunnel_key})

    def create(self, notify: Notify) -> "EnvMountUnit":
        return EnvMountUnit(self, notify)


class EnvMountUnit:
    """Reads the app's env and mounts through the agent, mounts the volumes, writes env files."""

    def __init__(self, spec: EnvMountSpec, notify: Notify | None = None) -> None:
        self.spec = spec
        self.key, self.spec_hash, self.depends_on = spec.key, spec.spec_hash, spec.depends_on
        self._notify = notify
        self.log = unit_logger("intercept", spec.intercept.name or spec.workload)
        self._state = UnitState()
        self.mount: Any = None  # SshfsMount, or a SyncMount (mount.mode: sync)
        self.env: dict[str, str] = {}
        self.mounts: list[str] = []
        self.mount_point: Path | None = None

    def health(self) -> UnitState:
        # A failed mount is the mount's row in the status (mount_row), not this unit's: the env is
        # still right and the tunnels still serve, so the intercept stays up (issue #19).
        if self.mount is not None and self._state.state is State.READY:
            ms = self.mount.health()
            self._state.detail = (f"mount failed: {ms.last_error}" if ms.state is State.FAILED
                                  else str(self.mount_point) if self.mount_point else None)
        return self._state

    async def start(self) -> None:
        # Here, not at the top: exec and sshfs pull in websockets and more, which load while the
        # rollout runs (engine/lateimports.py) rather than before it starts.
        from tpenv.engine.appenv import merge_app_env, read_app_env
        from tpenv.engine.mounts import make_mount, skip_default_mount

        s = self.spec
        self._state.set(State.STARTING)
        session = s.registry.session(s.tunnel_key)
        # The app process's env (its image's ENV) is read in its container while the agent answers.
        process = asyncio.ensure_future(read_app_env(s.kube, s.namespace, s.pod, s.container)) \
            if s.kube is not None else None
        try:
            base = await session.env()
            mounts = (await session.mounts())["mounts"]
        except BaseException:
            if process is not None:
                process.cancel()
            raise
        if process is not None:
            app = await process
            if app.why_not is not None and app.why_not not in s.said:
                s.said.add(app.why_not)
                self.log.warning("%s", app.why_not)
            base = merge_app_env(base, app.env)
        logs.secret_env(base)  # the app's secret values never reach a log line, at any level
        self.mounts = list(mounts)
        mount_spec = s.intercept.mount
        if mount_spec.path is not False and mounts and not skip_default_mount(
                mount_spec.mode, "mount" in s.intercept.model_fields_set, mounts, self.log, key=self.key):
            path = None if mount_spec.path is True else (s.base_dir / str(mount_spec.path))
            self.mount = make_mount(mount_spec.mode, session, path, list(mounts), name=s.intercept.name or s.workload,
                                    settings=s.settings)
            await self.mount.start()
            self.mount_point = self.mount.path
        base = dict(base)
        base["TELEPRESENCE_CONTAINER"] = s.container
        base["TELEPRESENCE_MOUNTS"] = ":".join(mounts)
        self.env = render_env(base, s.intercept, str(self.mount_point) if self.mount_point else None,
                              s.intercept_id, namespace=s.namespace)
        if s.intercept.env.file:
            write_env_file(self.env, s.base_dir / s.intercept.env.file, s.intercept.env.format)
        if s.env_json:
            write_env_file(self.env, s.base_dir / s.env_json, "json")
        self.log.info("env ready (%d variables)%s", len(self.env),
                      f", volumes at {self.mount_point}" if self.mount_point else "")
        self._state.set(State.READY, detail=str(self.mount_point) if self.mount_point else None)

    async def stop(self) -> None:
        if self._state.state in (State.STOPPING, State.STOPPED):
            return
        self._state.set(State.STOPPING)
        if self.mount is not None:
            await self.mount.stop()
        self._state.set(State.STOPPED)

    def abort(self) -> None:
        if self.mount is not None:
            self.mount.abort()
