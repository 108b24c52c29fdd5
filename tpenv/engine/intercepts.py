"""Intercepts: one workload port's traffic to a local port, with the app's env and volumes.

The pieces are reconciler units (``tpenv.engine.units``):

- ``("tunnel", ns, pod)`` for every ready pod whose agent serves the port (tunnels.py), each
  registering this session's intercept on that replica: traffic to any replica reaches us;
- ``("redirect", ns, pod)`` for a pod that (re)started without its ephemeral in-pod redirect
  (ephemeral.py); the pod gets a tunnel once the redirect has run;
- ``("intercept", ns, workload, port)``: the env and the mount, read through one replica's
  session (the first ready pod by name; it moves when that pod goes), depending on its tunnel (envmount.py).

:class:`InterceptRun` is what ``tpenv intercept`` runs: it resolves the workload, Service and
port, makes sure the agent is injected (agents.py), then runs a :class:`Reconciler` over
:meth:`InterceptRun.desired`, fed by a pod watch. ``tpenv up`` can use the same specs.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpenv.config.models import Intercept
from tpenv.engine import lateimports
from tpenv.engine.agents import (AgentReady, agent_port_name, ensure_agent, pick_service, pod_serves, pod_started,
                                 service_port)
from tpenv.engine.envmount import EnvMountSpec, EnvMountUnit, intercept_key
from tpenv.engine.ephemeral import redirect_added, redirect_specs
from tpenv.engine.teammode import NOTE as TEAM_MODE_NOTE, defaulted, effective_match, team_mode
from tpenv.engine.reconciler import Reconciler
from tpenv.engine.tunnels import Registration, TunnelRegistry, TunnelSpec, ensure_auth_material
from tpenv.engine.units import Key, State, UnitEvent
from tpenv.errors import TpenvError, TransientError
from tpenv.kits.aio import Backoff, unit_logger
from tpenv.kits.kube import Kube, What, Workload, pod_is_ready, tracked
from tpenv.settings import Settings
from tpenv_agent.inpod import redirect_state

if TYPE_CHECKING:
    from tpenv.engine.replace import Replacement

__all__ = ["EnvMountSpec", "EnvMountUnit", "InterceptRun", "Resolved", "intercept_key"]


@dataclass
class Resolved:
    """What an intercept resolved to in the cluster."""

    workload: Workload
    service: dict[str, Any]
    service_port: dict[str, Any]
    agent: AgentReady


class InterceptRun:
    """One intercept kept alive by a reconciler: ``async with InterceptRun(...) as run: ...``."""

    def __init__(self, kube: Kube, intercept: Intercept, namespace: str, session_id: str, settings: Settings, *,
                 progress=None, base_dir: Path = Path("."), env_json: str | None = None,
                 container: str | None = None) -> None:
        self.kube = kube
        self.intercept = intercept
        self.namespace = namespace
        self.session_id = session_id
        self.settings = settings
        self.progress = progress
        self.base_dir = base_dir
        self.env_json = env_json
        self.container = container
        self.intercept_id = f"{session_id}:{intercept.name}"
        # The rule registered: the intercept's, or (no rule, team mode) the personal header; see resolve().
        self.match = effective_match(intercept.match, False)
        self.team_default = False
        self.registry = TunnelRegistry()
        self.resolved: Resolved | None = None
        self.replacement: Replacement | None = None  # replace mode, while in force
        self.material: dict[str, bytes] = {}
        self.rec: Reconciler | None = None
        self._pods: dict[str, dict[str, Any]] = {}
        self._watch_task: asyncio.Task | None = None
        self._said: set[str] = set()  # warnings already given (EnvMountSpec.said)
        self._routed_checked = False  # the route probe after our rollout ran (wait_ready)
        self._settling: asyncio.Task[AgentReady] | None = None  # the rest of our rollout (_ensure_agent)
        self.log = unit_logger("intercept", intercept.name or intercept.workload)

    # -- resolving ------------------------------------------------------------------------

    async def resolve(self) -> Resolved:
        """Workload, Service, port; inject the agent when needed (progress lines while rolling out)."""
        ic = self.intercept
        # Team mode matters only without a rule; read alongside the workload, not after it.
        # Replace takes everything: never the team mode's personal header.
        team = asyncio.ensure_future(team_mode(self.kube)) if ic.match is None and ic.mode != "replace" else None
        if team is not None:  # its error is raised below; unread if resolving fails first
            team.add_done_callback(lambda t: t.cancelled() or t.exception())
        w = await self.kube.get_workload(ic.workload, self.namespace)
        if self.progress is not None:
            self.progress(f"Using {w.kind} {w.name}")  # Telepresence's first line
        service = await pick_service(self.kube, w, ic.service)
        sp = service_port(service, ic.port.remote)
        if ic.mode == "replace":
            # Not ensure_agent: every app port goes to the agent and the app stops (replace.py).
            from tpenv.engine.replace import start_replace

            self.replacement = await start_replace(
                self.kube, w, service, sp, self.settings, session=self.session_id, container=self.container,
                progress=self.progress or (lambda text: self.log.info("%s", text)))
            plan = self.replacement.plan
            agent = AgentReady(self.replacement.workload, service, plan.record, agent_port_name(sp),
                               plan.record["container"], True)
        else:
            agent = await self._ensure_agent(w, service, sp)
        self.material = await ensure_auth_material(self.kube, self.namespace)
        if team is not None:
            on = await team
            self.match, self.team_default = effective_match(ic.match, on), defaulted(ic.match, on)
            if self.team_default and self.progress is not None:
                self.progress(TEAM_MODE_NOTE)
        self.resolved = Resolved(agent.workload, agent.service, sp, agent)
        return self.resolved

    async def _ensure_agent(self, w: Workload, service: dict[str, Any], sp: dict[str, Any]) -> AgentReady:
        """ensure_agent, returning as soon as the workload is written when it rolls out: the rest
        of the rollout (the wait, the Service's hand-over, the endpoints) goes on in
        ``_settling``, awaited by :meth:`wait_ready`, while the units connect to each new pod as
        its agent starts, not after the last pod is Ready (issue 13, the `up` row)."""
        loop = asyncio.get_running_loop()
        written: asyncio.Future[AgentReady] = loop.create_future()
        task = asyncio.ensure_future(ensure_agent(
            self.kube, w, service, sp, self.settings, progress=self.progress, container=self.container,
            written=lambda agent: written.done() or written.set_result(agent)))
        try:
            await asyncio.wait({task, written}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task.done():
            return task.result()
        self._settling = task
        return written.result()

    async def _settled(self) -> None:
        """The rollout begun by resolve() has ended: the agent as ensure_agent returned it (its
        error, the workload restored, raised here)."""
        task = self._settling
        if task is None:
            return
        agent = await task
        self._settling = None
        assert self.resolved is not None
        self.resolved = Resolved(agent.workload, agent.service, self.resolved.service_port, agent)
        if self.rec is not None:
            self.rec.notify(UnitEvent("kube", detail=("rollout", "done")))

    # -- the units ----------------------------------------------------------------------------

    @property
    def key(self) -> Key:
        return intercept_key(self.namespace, self.intercept.workload_name, self.intercept.port)

    def registration(self) -> Registration:
        assert self.resolved is not None
        match = self.match.wire(self.intercept_id) if self.match else None
        mode = "intercept" if self.intercept.mode == "replace" else self.intercept.mode
        return Registration(self.intercept.name or "", self.resolved.agent.port_name, match, self.intercept.port.local,
                            mode, self.intercept.force)

    def registrations(self) -> tuple[Registration, ...]:
        """The intercept's own; in replace mode also every other port of the app, all TCP, each to
        the same port number on this machine (as Telepresence's replace does)."""
        main = self.registration()
        if self.replacement is None:
            return (main,)
        extra = tuple(Registration(f"{main.name}-{e['app_port']}", e["name"], None, int(e["app_port"]))
                      for e in self.replacement.plan.ports if e["name"] != main.port)
        return (main, *extra)

    def tunnel_pods(self) -> list[dict[str, Any]]:
        """The pods that get a tunnel, by name: every started pod whose agent serves the port, Ready
        or not yet. A pod still starting gets its tunnel while it becomes Ready, so the intercept
        is registered there before the endpoints send it anything (issue 13: a rollout's new pod,
        a restarted one). A pod whose redirect is not even added passes its traffic to the app:
        not ours yet."""
        assert self.resolved is not None
        name = self.resolved.agent.port_name
        pods = [p for p in self._pods.values() if pod_serves(p, name) and redirect_added(p)
                and (pod_is_ready(p) or pod_started(p))]
        return sorted(pods, key=lambda p: p["metadata"]["name"])

    def ready_pods(self) -> list[dict[str, Any]]:
        """The tunnel pods that are Ready, by name."""
        return [p for p in self.tunnel_pods() if pod_is_ready(p)]

    def desired(self) -> dict[Key, Any]:
        assert self.resolved is not None
        specs: dict[Key, Any] = {}
        s = self.settings
        tunnel_pods = self.tunnel_pods()
        for pod in tunnel_pods:
            spec = TunnelSpec(self.kube, self.registry, self.namespace, pod["metadata"]["name"],
                              pod["metadata"]["uid"], self.session_id, self.material, self.registrations(),
                              ssh_port=s.agent.ssh_port, connect_timeout=s.tunnels.connect_timeout,
                              leave_drain=s.tunnels.leave_drain, streams=s.tunnels.streams,
                              sftp_stream=s.mounts.own_stream,
                              starting=not pod_is_ready(pod))
            specs[spec.key] = spec
        # A pod that (re)started without its redirect gets it (ephemeral.py); during our rollout
        # the rollout's wait adds it (agents.wait_rollout), as soon as the pod exists.
        if self._settling is None:
            serving = [p for p in self._pods.values() if pod_serves(p, self.resolved.agent.port_name)]
            specs.update(redirect_specs(self.kube, serving))
        # The env from the first Ready pod by name; while none is (our rollout), the first started.
        pods = [p for p in tunnel_pods if pod_is_ready(p)] or tunnel_pods
        if pods:
            em = EnvMountSpec(self.namespace, self.intercept.workload_name, pods[0]["metadata"]["name"],
                              self.intercept_id, self.resolved.agent.container, self.base_dir, self.env_json,
                              registry=self.registry, intercept=self.intercept, settings=self.settings,
                              kube=self.kube, said=self._said)
            specs[em.key] = em
        return specs

    async def _watch_pods(self) -> None:
        """Keep ``_pods`` current. A watch that fails (API server unreachable, connection cut) is
        opened again with backoff, after a fresh list: pods deleted meanwhile are forgotten."""
        assert self.resolved is not None and self.rec is not None
        w = self.resolved.workload
        t = self.settings.tunnels
        backoff = Backoff(t.retry_initial, t.retry_max)
        relist = False
        while True:
            try:
                if relist:
                    self._pods = {p["metadata"]["uid"]: p for p in await self.kube.pods_of(w)}
                    self.rec.notify(UnitEvent("kube", detail=("pods", "listed again")))
                    self.log.info("watching the pods of %s again", w.ref)
                backoff.started()
                async with self.kube.watch(self.kube.core.list_namespaced_pod, w.namespace,
                                           label_selector=w.selector, what=What("watch", "pods", w.namespace)) as events:
                    async for kind, pod in tracked(events, self._pods):
                        self.rec.notify(UnitEvent("kube", detail=("pod", kind, pod["metadata"]["name"])))
                raise TransientError(f"the watch of {w.ref}'s pods ended")
            except Exception as e:  # noqa: BLE001 - retried; cancellation is not an Exception
                delay = backoff.failed()
                self.log.warning("watch of %s's pods failed: %s (again in %.1fs)", w.ref, e, delay)
                relist = True
                await asyncio.sleep(delay)

    async def start(self) -> None:
        if self.resolved is None:
            await self.resolve()
        assert self.resolved is not None
        await lateimports.ready()  # begun by the rollout; before the first tunnel imports them too
        pods = await self.kube.pods_of(self.resolved.workload)
        self._pods = {p["metadata"]["uid"]: p for p in pods}
        t = self.settings.tunnels
        self.rec = Reconciler(self.desired, debounce=0.1, restart_initial=t.retry_initial, restart_max=t.retry_max,
                              name=self.intercept.name or "intercept")
        await self.rec.__aenter__()
        self._watch_task = asyncio.ensure_future(self._watch_pods())

    # -- state for the CLI -------------------------------------------------------------------

    def env_unit(self) -> EnvMountUnit | None:
        if self.rec is None:
            return None
        unit = self.rec.running.get(self.key)
        return unit if isinstance(unit, EnvMountUnit) else None

    def mount_row(self) -> dict[str, Any] | None:
        """The status row of this intercept's mount (``mount/NAME``), when it has one."""
        unit = self.env_unit()
        mount = unit.mount if unit is not None else None
        if mount is None:
            return None
        st = mount.health()
        key = ["mount", self.intercept.name or self.intercept.workload_name]
        return {"key": key, "kind": "mount", "name": "/".join(key), "state": State(st.state).value,
                "since": st.since, "last_error": st.last_error, "restarts": st.restarts,
                "detail": st.detail, "pid": getattr(mount, "pid", None)}

    def env_of(self, name: str) -> dict[str, str] | None:
        """The env this intercept's handler gets, if ``name`` is this intercept and it is ready."""
        unit = self.env_unit()
        if name != self.intercept.name or unit is None or unit.health().state is not State.READY:
            return None
        return dict(unit.env)

    def first_error(self, *, permanent_only: bool = False) -> TpenvError | str | None:
        """A failed unit's last error. ``permanent_only``: only failures retrying cannot fix (a
        conflict, a refusal), which end the wait at once; a dropped tunnel is retried meanwhile."""
        assert self.rec is not None
        # The reconciler keeps which keys failed permanently (no public accessor yet).
        permanent = getattr(self.rec, "_permanent", set())
        for u in self.rec.snapshot()["units"]:
            if u["state"] == State.FAILED.value and u["last_error"]:
                if not permanent_only or tuple(u["key"]) in permanent:
                    return self.rec.errors.get(tuple(u["key"])) or u["last_error"]  # the error kept whole
        return None

    def mirror_stats(self) -> dict[str, int]:
        """Copies sent to this machine and dropped (slow or absent handler), summed over the replicas."""
        out = {"sent": 0, "dropped": 0}
        for unit in list(self.registry.units.values()):
            stats = (unit.session.mirror_stats if unit.session is not None else {}).get(self.intercept_id) or {}
            for k in out:
                out[k] += int(stats.get(k) or 0)
        return out

    def is_ready(self) -> bool:
        if self.rec is None:
            return False
        unit = self.env_unit()
        if unit is None or unit.health().state is not State.READY:
            return False
        rec = self.rec

        def up(k: Key) -> bool:
            return k in rec.running and rec.running[k].health().state is State.READY

        # Every Ready pod's tunnel, and at least one: a pod still starting (or one that never
        # will, crash-looping) holds nothing up; its tunnel is there before it serves.
        ready = {p["metadata"]["name"] for p in self.ready_pods()}
        tunnels = [k for k in rec.specs if k[0] == "tunnel"]
        return any(up(k) for k in tunnels) and all(up(k) for k in tunnels if k[2] in ready)

    async def wait_ready(self, timeout: float, serving: Callable[[], None] | None = None) -> None:
        """Until every tunnel and the env are ready and, after our rollout, the node routes to the
        agents; the first unit error ends the wait. ``serving`` is called between the two: the
        tunnels and the env are there, so what needs only them (``up`` starts the handler) starts
        while kube-proxy catches up, as it would for a plain rollout (issue 13)."""
        assert self.rec is not None
        from tpenv.errors import TransientError

        if self._settling is not None:
            await self._overlapped(timeout, serving)
            if self._settling is not None:  # a unit failed for good before the rollout ended
                raise _as_error(self.first_error(permanent_only=True))
        ok = await self.rec.wait_until(self._ready_or_failed, timeout)
        if self.is_ready():
            if serving is not None:
                serving()
            await self._routed()
            return
        err = self.first_error()
        if err is not None:
            raise _as_error(err)
        if not ok:
            raise TransientError(f"the intercept {self.intercept.name} was not ready within {timeout:.0f}s")

    def _ready_or_failed(self, _rec: Reconciler) -> bool:
        """What wait_ready waits for: the units ready, or one failed for good."""
        return self.is_ready() or self.first_error(permanent_only=True) is not None

    async def _overlapped(self, timeout: float, serving: Callable[[], None] | None) -> None:
        """During our rollout: the first new pods' tunnels and the env may be ready before it
        ends; then ``serving`` starts the handler while the rest rolls out. Returns when the
        rollout has ended (its error raised), or on a unit's permanent error (wait_ready raises it)."""
        assert self.rec is not None and self._settling is not None
        settle = asyncio.ensure_future(self._settled())
        units = asyncio.ensure_future(self.rec.wait_until(self._ready_or_failed, timeout))
        try:
            await asyncio.wait({settle, units}, return_when=asyncio.FIRST_COMPLETED)
            if not settle.done() and self.is_ready() and serving is not None:
                serving()
            if not settle.done() and self.first_error(permanent_only=True) is not None:
                return
            await settle
        finally:
            for t in (settle, units):
                t.cancel()
            await asyncio.gather(settle, units, return_exceptions=True)

    async def _routed(self) -> None:
        """Once: after a rollout of ours, until new connections to the Service reach the agents
        (routeready.py; its own bound, kube.endpoints_timeout, and it says when that passed);
        without one, until the ephemeral redirects of pods restarted meanwhile have run."""
        assert self.resolved is not None
        if self._routed_checked:
            return
        if not self.resolved.agent.rolled_out:
            # The agent was there; a pod restarted while no tpenv ran has just been given its
            # redirect (ephemeral.py): until it ran, that pod's callers reach the app.
            await self._redirects_ran()
            self._routed_checked = True
            return
        if (self.resolved.service.get("spec") or {}).get("clusterIP") == "None":
            await self._redirects_ran()  # no ClusterIP to probe: the kubelet's word, then
        from tpenv.engine.routeready import wait_routed

        await wait_routed(self, self.progress)
        self._routed_checked = True

    def _redirects_done(self) -> bool:
        """Every Ready pod serving the port has run its redirect (or installs none this way)."""
        assert self.resolved is not None
        name = self.resolved.agent.port_name
        return all(redirect_state(p)[0] in ("none", "done") for p in self._pods.values()
                   if pod_is_ready(p) and pod_serves(p, name) and not p["metadata"].get("deletionTimestamp"))

    async def _redirects_ran(self) -> None:
        """Until every ready pod's ephemeral redirect has ended with exit 0 (the pod watch wakes the
        reconciler), bounded by kube.endpoints_timeout; past it, said, and tpenv goes on."""
        assert self.rec is not None
        timeout = self.settings.kube.endpoints_timeout
        if not await self.rec.wait_until(lambda _rec: self._redirects_done(), timeout) and self.progress is not None:
            self.progress(f"the in-pod redirect has not reported its end within {timeout:.0f}s; callers of "
                          f"the pods may reach the app until it does")

    def snapshot(self) -> dict[str, Any]:
        out = self.rec.snapshot() if self.rec is not None else {"units": []}
        if (row := self.mount_row()) is not None:
            out["units"].append(row)
        out["intercepts"] = [self.describe()]
        return out

    def describe(self) -> dict[str, Any]:
        r = self.resolved
        unit = self.env_unit()
        return {
            "name": self.intercept.name,
            "id": self.intercept_id,
            "namespace": self.namespace,
            "workload": r.workload.name if r else self.intercept.workload_name,
            "workload_kind": r.workload.kind if r else None,
            "service": r.service["metadata"]["name"] if r else None,
            "service_port": r.service_port.get("name") or r.service_port["port"] if r else None,
            "destination": f"127.0.0.1:{self.intercept.port.local}",
            "mount_point": str(unit.mount_point) if unit and unit.mount_point else None,
            "match": self.match.wire(self.intercept_id) if self.match else None,
            "team_mode_default": self.team_default,
            "mode": self.intercept.mode,
            **({"mirror": self.mirror_stats()} if self.intercept.mode == "mirror" else {}),
            **({"replaced": {"container": self.replacement.plan.record["container"],
                             "ports": {str(e["app_port"]): self.intercept.port.local if e["name"] == r.agent.port_name
                                       else int(e["app_port"]) for e in self.replacement.plan.ports}}}
               if self.replacement is not None and r is not None else {}),
            "pods": [k[2] for k in (self.rec.running if self.rec else {}) if k[0] == "tunnel"],
            "state": "ACTIVE" if self.is_ready() else "WAITING",
        }

    async def stop(self) -> None:
        """Leave: stop the reconciler (each tunnel leaves and closes), end the watch. Safe twice.
        A rollout still being waited for is left to finish by itself (the agent stays injected,
        in passthrough, as after any intercept)."""
        if self._settling is not None:
            self._settling.cancel()
            with contextlib.suppress(BaseException):
                await self._settling
            self._settling = None
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(BaseException):
                await self._watch_task
            self._watch_task = None
        if self.rec is not None:
            await self.rec.close()
        if self.replacement is not None:
            # After the tunnels left (no new connection goes to this machine): the app comes back.
            await self.replacement.end(self.progress)

    def abort(self) -> None:
        if self.rec is not None:
            self.rec.abort()

    async def __aenter__(self) -> "InterceptRun":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _as_error(err: Any) -> TpenvError:
    if isinstance(err, TpenvError):
        return err
    from tpenv.errors import Conflict, PermanentError

    text = str(err)
    if "conflict" in text.lower() or "already intercepted" in text.lower() or "held by" in text.lower():
        return Conflict(text)
    return PermanentError(text)
