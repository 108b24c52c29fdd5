"""Tunnels: one SSH session to the agent of each started pod, over the API server's port-forward.

A :class:`TunnelUnit` (key ``("tunnel", namespace, pod)``) opens an :class:`AgentSession` over a
:class:`PodTunnel` to the agent's loopback SSH port and registers this session's intercepts on
that replica (each with a ``tcpip-forward`` to ``127.0.0.1:<local port>``). A pod gets its
tunnel once it is on a node, before it is Ready (intercepts.py): the unit then waits for the
agent's SSH banner first (``starting``; kits/portforward.wait_greeting), so the intercept is
registered there before the endpoints send the pod anything. When the SSH session
ends (pod deleted, port-forward dropped, agent restarted) the unit reports ``unit_failed``; the
reconciler reopens it with backoff, or forgets it when the pod is gone from the desired set.

The credentials come from Secret ``tpenv-auth`` in the namespace (docs/protocol.md §2), created
here on first use (:func:`ensure_auth_material`).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tpenv.engine.injection import AUTH_KEYS, auth_secret_manifest
from tpenv.engine.units import Key, Notify, State, UnitEvent, UnitState, hash_spec
from tpenv.errors import NotFound, PermanentError, TransientError, TunnelDropped
from tpenv.kits.aio import unit_logger
from tpenv.kits.kube import Kube, What
from tpenv.settings import AgentSettings, MountSettings, TunnelSettings
from tpenv_agent.authkeys import auth_material
from tpenv_agent.inject import AUTH_SECRET

if TYPE_CHECKING:
    from tpenv.kits.agent_client import AgentSession

# asyncssh (with cryptography) and the port-forward transports are imported where a tunnel opens,
# not with this module: `up` and `intercept` import it before the rollout starts, and these load
# while the rollout runs instead (engine/lateimports.py).

# A tunnel's stop, each step bounded (engine/up.py's shutdown_grace adds them up): the agent's
# answer to a leave beyond its drain, then the session's close.
LEAVE_ANSWER = 3.0
CLOSE_WAIT = 5.0


async def ensure_auth_material(kube: Kube, namespace: str, *, seen_missing: bool = False) -> dict[str, bytes]:
    """The four keys of Secret tpenv-auth in ``namespace``; the Secret is created when missing.
    ``seen_missing``: the caller has just read it as missing (injection does, before its write),
    so the create goes first; a 409 then reads the one another client made meanwhile."""
    what = What("get", "secrets", namespace, AUTH_SECRET)
    for attempt in range(2):
        secret = None
        if attempt or not seen_missing:
            try:
                secret = await kube.call(kube.core.read_namespaced_secret, AUTH_SECRET, namespace, what=what)
            except NotFound:
                pass
        if secret is None:
            manifest = auth_secret_manifest(namespace, auth_material())
            try:
                secret = await kube.call(kube.core.create_namespaced_secret, namespace, manifest,
                                         what=What("create", "secrets", namespace, AUTH_SECRET))
            except TransientError:  # 409: another client created it between our get and create
                continue
        data = secret.get("data") or {}
        missing = [k for k in AUTH_KEYS if k not in data]
        if missing:
            raise PermanentError(f"Secret {AUTH_SECRET} in namespace {namespace!r} lacks {', '.join(missing)}",
                                 hint=f"delete it (kubectl delete secret {AUTH_SECRET} -n {namespace}) and "
                                      f"restart the agent pods; tpenv creates a new one")
        return {k: base64.b64decode(data[k]) for k in AUTH_KEYS}
    raise TransientError(f"Secret {AUTH_SECRET} in {namespace!r} keeps changing; retry")


@dataclass(frozen=True)
class Registration:
    """One intercept this session holds on every replica of a workload."""

    name: str  # the intercept name; the agent's id is "<session>:<name>"
    port: str | int  # the agent port name as given in --listen (protocol §3)
    match: dict[str, Any] | None  # None: all TCP
    local_port: int
    mode: str = "intercept"  # or "mirror": copies of the matched requests (protocol §3)
    force: bool = False  # take it over from another user (the agent checks the RBAC right, protocol §2.1)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "match": self.match, "local_port": self.local_port,
                "mode": self.mode, **({"force": True} if self.force else {})}


class TunnelRegistry:
    """The running tunnels by key, so dependents (env, mounts) can reach a pod's session."""

    def __init__(self) -> None:
        self.units: dict[Key, "TunnelUnit"] = {}

    def session(self, key: Key) -> AgentSession:
        unit = self.units.get(key)
        if unit is None or unit.session is None or unit.session.closed.is_set():
            raise TunnelDropped(f"no open tunnel {'/'.join(map(str, key))}")
        return unit.session


@dataclass(frozen=True)
class TunnelSpec:
    """Desired: a session to the agent of ``pod`` holding ``registrations``."""

    kube: Kube = field(compare=False, repr=False)
    registry: TunnelRegistry = field(compare=False, repr=False)
    namespace: str
    pod: str
    pod_uid: str
    session_id: str
    material: dict[str, bytes] = field(compare=False, repr=False)
    registrations: tuple[Registration, ...] = ()
    # The documented defaults (settings.agent, settings.tunnels); the engine passes the settings.
    ssh_port: int = AgentSettings().ssh_port
    connect_timeout: float = TunnelSettings().connect_timeout
    leave_drain: float = TunnelSettings().leave_drain
    streams: int = TunnelSettings().streams
    sftp_stream: bool = MountSettings().own_stream
    # The pod is not Ready yet: its agent may not listen yet either, so the unit waits for its
    # SSH banner before connecting (kits/portforward.wait_greeting). Not part of the spec: the
    # pod becoming Ready changes nothing in a session already open.
    starting: bool = field(default=False, compare=False)

    @property
    def key(self) -> Key:
        return ("tunnel", self.namespace, self.pod)

    @property
    def spec_hash(self) -> str:
        # A new pod with the same name (StatefulSet) is a new tunnel: the uid is part of it.
        return hash_spec(self.pod_uid, self.session_id, [r.as_json() for r in self.registrations], self.ssh_port)

    @property
    def depends_on(self) -> frozenset[Key]:
        return frozenset()

    def create(self, notify: Notify) -> "TunnelUnit":
        return TunnelUnit(self, notify)


class TunnelUnit:
    """A running tunnel; see the module docstring."""

    def __init__(self, spec: TunnelSpec, notify: Notify | None = None) -> None:
        self.spec = spec
        self.key = spec.key
        self.spec_hash = spec.spec_hash
        self.depends_on = spec.depends_on
        self._notify = notify
        self.log = unit_logger("tunnel", f"{spec.namespace}/{spec.pod}")
        from tpenv.kits.portforward import PodTunnel

        self.tunnel = PodTunnel(spec.kube, spec.namespace, spec.pod)
        self.session: AgentSession | None = None
        self._state = UnitState()
        self._watch: asyncio.Task | None = None
        self._stopping = False

    def health(self) -> UnitState:
        return self._state

    async def start(self) -> None:
        from tpenv.kits.agent_client import AgentSession

        s = self.spec
        if s.starting:
            from tpenv.kits.portforward import wait_greeting

            self._state.set(State.STARTING, detail=f"waiting for the agent in {s.pod} to listen")
            try:
                await wait_greeting(self.tunnel, s.ssh_port, timeout=s.connect_timeout)
            except BaseException:
                self.tunnel.close()
                raise
        self._state.set(State.STARTING, detail=f"port-forward to {s.pod}:{s.ssh_port}")
        session = AgentSession(s.session_id, ca_key=s.material["ca_key"], host_key_pub=s.material["host_key.pub"],
                               host=s.pod, port=s.ssh_port, tunnel=self.tunnel, connect_timeout=s.connect_timeout,
                               token=s.kube.bearer_token(), streams=s.streams, sftp_stream=s.sftp_stream)
        try:
            await session.connect()
            for r in s.registrations:
                await session.intercept(r.name, port=r.port, match=r.match, local_port=r.local_port, mode=r.mode,
                                        force=r.force)
                self.log.info("intercept %s registered (port %s -> 127.0.0.1:%d%s)", r.name, r.port, r.local_port,
                              ", mirror" if r.mode == "mirror" else "")
        except BaseException:
            session.close()
            with contextlib.suppress(Exception):
                await session.wait_closed()
            self.tunnel.close()
            raise
        self.session = session
        self.spec.registry.units[self.key] = self
        self._watch = asyncio.ensure_future(self._watch_session())
        self._state.set(State.READY, detail=f"agent {session.info.get('agent', '?')} in {s.pod}")

    async def _watch_session(self) -> None:
        assert self.session is not None
        await self.session.closed.wait()
        if self._stopping:
            return
        self._state.set(State.FAILED, error="the agent session ended (pod gone or port-forward dropped)")
        if self.spec.registry.units.get(self.key) is self:
            del self.spec.registry.units[self.key]
        if self._notify is not None:
            self._notify(UnitEvent("unit_failed", self.key, error="agent session lost",
                                   exc=TunnelDropped("agent session lost")))

    async def stop(self) -> None:
        """Close the session: the agent ends this session's intercepts at once. Safe twice."""
        if self._stopping:
            return
        self._stopping = True
        self._state.set(State.STOPPING)
        if self.spec.registry.units.get(self.key) is self:
            del self.spec.registry.units[self.key]
        if self.session is not None:
            # Leave everywhere first, then drain: each leave stops new work at once; what was
            # already sent to us finishes before the session (and its channels) closes.
            drain = self.spec.leave_drain
            await asyncio.gather(*(asyncio.wait_for(self.session.leave(r.name, drain=drain), drain + LEAVE_ANSWER)
                                   for r in self.spec.registrations), return_exceptions=True)
            self.session.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.session.wait_closed(), CLOSE_WAIT)
        if self._watch is not None:
            self._watch.cancel()
        self.tunnel.close()
        self._state.set(State.STOPPED)

    def abort(self) -> None:
        self._stopping = True
        if self.session is not None:
            self.session.close()
        self.tunnel.close()
