"""The ``tpenv-control`` subsystem (contract §3): newline-delimited JSON, one request at a time.

One ``ControlChannel`` per open control channel. The intercepts it registers are its own:
they end when the channel closes, when the SSH connection drops, or when no ``ping`` came
for ``lease`` seconds (the client was SIGKILLed, the laptop slept, the network is cut).
"""
from __future__ import annotations

import asyncio
import inspect
import json
import time
from typing import TYPE_CHECKING, Any

from . import __version__
from . import log as logs
from .identity import IdentityError
from .registry import ControlError, Intercept, Match
from .routeprobe import dial

if TYPE_CHECKING:
    from .sidecar import Sidecar
    from .sshd import ConnState

ABANDONED_KEPT = 8  # the last intercepts whose client vanished, reported by `list`


class ControlChannel:
    def __init__(self, sidecar: "Sidecar", state: "ConnState", process: Any) -> None:
        self.sidecar, self.state, self.process = sidecar, state, process
        self.session = state.username
        self.log = logs.unit("session", self.session)
        self._pinged = asyncio.Event()
        # Who this session is (identity.py): the verified Kubernetes user, else its session id.
        self.user = f"session {self.session}"
        self.verified = False
        self._token: str | None = None  # kept only to ask the cluster about `force`; never logged

    async def run(self) -> None:
        self.state.controls.append(self)
        watchdog = asyncio.ensure_future(self._lease())
        try:
            while True:
                line = await self.process.stdin.readline()
                if not line:
                    break
                answer = await self._answer(line)
                self.process.stdout.write(json.dumps(answer).encode() + b"\n")
                await self.process.stdout.drain()
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as e:
            self.log.info("control channel lost: %s", type(e).__name__)
        finally:
            watchdog.cancel()
            self.end("control channel closed")
            self.state.controls.remove(self)
            try:
                self.process.exit(0)
            except (OSError, RuntimeError):
                pass

    def end(self, why: str) -> None:
        for icpt in self.sidecar.registry.remove_owned_by(self):
            self.log.info("intercept %s ended: %s", icpt.intercept_id, why)
            # A client that leaves sends `leave` first, so what is still held here was abandoned
            # (kill -9, a closed laptop, a cut network): remembered, so `list` can tell an agent
            # kept in passthrough after a leave (by design) from one whose client vanished.
            self.sidecar.abandoned = [*self.sidecar.abandoned[-(ABANDONED_KEPT - 1):],
                                      {**icpt.describe(), "ended": why,
                                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]

    async def _lease(self) -> None:
        """Ends this channel's intercepts when pings stop; the connection is closed too, so the
        client learns it lost them instead of believing it still holds them."""
        lease = self.sidecar.lease
        while True:
            try:
                await asyncio.wait_for(self._pinged.wait(), lease)
            except asyncio.TimeoutError:
                self.log.warning("no ping for %ss: lease expired", lease)
                self.end("lease expired")
                self.state.conn.close()
                return
            self._pinged.clear()

    # --- requests -----------------------------------------------------------------------
    async def _answer(self, line: bytes) -> dict[str, Any]:
        rid = None
        try:
            try:
                req = json.loads(line)
            except ValueError:
                raise ControlError("bad-request", "not a JSON object") from None
            if not isinstance(req, dict):
                raise ControlError("bad-request", "not a JSON object")
            rid = req.get("id")
            op = req.get("op")
            handler = getattr(self, f"_op_{op.replace('-', '_')}", None) if isinstance(op, str) else None
            if handler is None:
                raise ControlError("bad-request", f"unknown op {op!r}")
            self._pinged.set()  # any request proves the client alive
            result = handler(req)
            if inspect.isawaitable(result):
                result = await result
            return {"id": rid, "ok": True, **result}
        except ControlError as e:
            return {"id": rid, "ok": False, "error": {"code": e.code, "message": e.message}}
        except Exception as e:  # a bug here must not kill the channel
            self.log.exception("request failed")
            return {"id": rid, "ok": False, "error": {"code": "internal", "message": type(e).__name__}}

    async def _op_hello(self, req: dict) -> dict:
        if req.get("session") not in (None, self.session):
            raise ControlError("bad-request", "session must equal the SSH user (the certificate principal)")
        await self._identify(req.get("token"))
        self.log.info("hello from client %s, user %s%s", str(req.get("client", "?"))[:40], self.user,
                      "" if self.verified else " (unverified)")
        sc = self.sidecar
        streams = self._streams()
        return {"user": self.user, "verified": self.verified,
            "agent": __version__, "pod": sc.pod, "namespace": sc.namespace, "container": sc.container,
            "ports": [{"name": p.name, "agent_port": p.agent_port, "app_port": p.app_port} for p in sc.registry.ports],
            "lease": sc.lease,
            "features": ["mirror", "route-probe", *(["streams", "sftp-stream"] if streams else [])],
            **streams,
        }

    def _streams(self) -> dict[str, Any]:
        """Where and how this session parks port-forward streams (streams.py), if it can."""
        port = self.sidecar.stream_port
        if port is None or port.port is None:
            return {}
        if self.state.stream_token is None:
            self.state.stream_token = port.register(self.state)
        return {"streams": {"port": port.port, "token": self.state.stream_token}}

    async def _identify(self, token: Any) -> None:
        """The session's user, from the cluster (identity.py). A token the cluster rejects is
        refused outright: a client that offers proof and fails is not let in as unverified."""
        api = self.sidecar.api
        if not isinstance(token, str) or not token or api is None or not api.available:
            return
        try:
            user = await api.whoami(token)
        except IdentityError as e:
            raise ControlError("forbidden", f"identity not verified: {e}") from None
        self.user, self.verified, self._token = user, True, token

    async def _may_force(self, req: dict) -> bool:
        if req.get("force") is not True:
            return False
        api = self.sidecar.api
        if not self.verified or api is None or self._token is None:
            raise ControlError("forbidden", "force needs a verified user (a bearer token the cluster accepts)")
        try:
            allowed = await api.may_force(self._token, self.sidecar.namespace)
        except IdentityError as e:
            raise ControlError("forbidden", f"cannot check the right to force: {e}") from None
        if not allowed:
            raise ControlError("forbidden", f"{self.user} may not force intercepts.tpenv.io in namespace "
                                            f"{self.sidecar.namespace} (RBAC: verb force, apiGroup tpenv.io)")
        return True

    def _op_ping(self, req: dict) -> dict:
        # This session's mirror counters ride on the heartbeat, so the client's status stays current.
        mirrors = {i.intercept_id: dict(i.mirror_stats) for i in self.sidecar.registry.all()
                   if i.session == self.session and i.mirror}
        return {"time": time.time(), **({"mirror": mirrors} if mirrors else {})}

    async def _op_intercept(self, req: dict) -> dict:
        iid = req.get("intercept_id")
        if not isinstance(iid, str) or not iid.startswith(self.session + ":") or iid == self.session + ":":
            raise ControlError("bad-request", "intercept_id must be '<session>:<name>' of this session")
        port = self.sidecar.registry.find_port(req.get("port"))
        match = None if req.get("match") is None else Match(req["match"])
        fwd = req.get("forward")
        if not isinstance(fwd, dict) or not isinstance(fwd.get("host"), str) or not isinstance(fwd.get("port"), int):
            raise ControlError("bad-request", "forward must be {host, port} registered with tcpip-forward")
        forward = (fwd["host"].lower(), fwd["port"])
        if forward not in self.state.forwards:
            raise ControlError("bad-request", "forward was not registered with tcpip-forward on this connection")
        mode = req.get("mode", "intercept")
        if mode not in ("intercept", "mirror"):
            raise ControlError("bad-request", f"mode must be 'intercept' or 'mirror', not {mode!r}")
        icpt = Intercept(iid, self.session, port, match, forward, owner=self, opener=self.state.opener(forward),
                         user=self.user, verified=self.verified, mirror=mode == "mirror")
        registry = self.sidecar.registry
        taken = [i for i in registry.all() if i.user != self.user and (
            i.intercept_id == iid or (icpt.match is None and not icpt.mirror and i.port is port
                                      and i.match is None and not i.mirror))]
        force = registry.takes_from_others(icpt) and await self._may_force(req)
        registry.add(icpt, force=force)
        self.sidecar.abandoned = []  # someone is using the agent again: what was abandoned no longer matters
        if force:
            for other in taken:
                self.log.warning("intercept %s of %s taken over by %s as %s (force)", other.intercept_id, other.user,
                                 self.user, iid)
        self.log.info("intercept %s on port %s (%s%s)", iid, port.name, "all TCP" if match is None else "HTTP match",
                      ", mirror" if icpt.mirror else "")
        return {"intercept": icpt.describe()}

    async def _op_leave(self, req: dict) -> dict:
        iid = req.get("intercept_id")
        found = [i for i in self.sidecar.registry.all() if i.intercept_id == iid
                 and (i.session == self.session or req.get("force") is True)]
        if not found:
            raise ControlError("not-found", f"no intercept {iid} of this session")
        force = found[0].user != self.user and await self._may_force(req)
        self.sidecar.registry.remove(found[0].intercept_id, user=self.user, force=force)
        self.log.info("intercept %s left%s", iid, f" (forced by {self.user})" if force else "")
        return {}

    def _op_list(self, req: dict) -> dict:
        return {"intercepts": [i.describe() for i in self.sidecar.registry.all()],
                "abandoned": list(self.sidecar.abandoned)}

    # --- route probes (routeprobe.py, protocol §3.1) --------------------------------------
    def _op_probe_watch(self, req: dict) -> dict:
        seconds = req.get("seconds")
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
            raise ControlError("bad-request", "seconds must be a number >= 0")
        self.sidecar.probes.watch(seconds)
        return {}

    async def _op_probe_dial(self, req: dict) -> dict:
        host, port, count, timeout = req.get("host"), req.get("port"), req.get("count", 8), req.get("timeout", 1.0)
        if not isinstance(host, str) or not host or not isinstance(port, int) or not 0 < port < 65536:
            raise ControlError("bad-request", "host (an address) and port are needed")
        if not isinstance(count, int) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 10:
            raise ControlError("bad-request", "count must be an integer, timeout a number of seconds in (0, 10]")
        return {"probes": await dial(host, port, count, float(timeout))}

    def _op_probe_seen(self, req: dict) -> dict:
        return {"seen": [list(p) for p in self.sidecar.probes.take()]}

    def _op_env(self, req: dict) -> dict:
        return {"env": self.sidecar.app_env()}

    def _op_mounts(self, req: dict) -> dict:
        return {"root": self.sidecar.mounts_root, "mounts": self.sidecar.mount_paths()}
