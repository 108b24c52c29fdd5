"""``tpenv-agent sidecar``: listeners, SSH server and health server of one pod's agent.

Prints one JSON line on stdout when ready, ``{"ready": true, "ssh": port, "health": port,
"listeners": {name: agent_port}, "streams": port or null}``, so a parent that bound port 0
learns the real ports without polling. Logs are JSON lines on stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from typing import Any

from . import envreport
from .agentspec import SSH_HOST, SSH_PORT, STREAMS_PORT
from . import log as logs
from . import sshd
from .main import SCHED_ENV
from .health import HealthServer
from .kubelet import KubeletPeers
from .identity import ApiServer
from .listener import PortListener
from .registry import PortSpec, Registry
from .restorer import Restorer
from .routeprobe import ProbeRecord
from .sftp import ConfinedSFTPServer
from .streams import StreamPort


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"want HOST:PORT, got {text!r}")
    return host, int(port)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpenv-agent sidecar", description="The traffic agent in an app's pod.")
    p.add_argument("--container", default="app", help="the app container's name")
    p.add_argument("--listen", action="append", default=[], type=PortSpec.parse,
                   metavar="AGENT_PORT:APP_PORT[:NAME]", help="one per intercepted port")
    p.add_argument("--ssh", type=_hostport, default=(SSH_HOST, SSH_PORT), metavar="HOST:PORT")
    p.add_argument("--health", type=_hostport, default=None, metavar="HOST:PORT")
    p.add_argument("--streams", type=_hostport, default=(SSH_HOST, STREAMS_PORT), metavar="HOST:PORT",
                   help="loopback port where clients park port-forward streams for intercepted connections "
                        "(told to each session in its hello answer); 'off:0' turns it off")
    p.add_argument("--auth-dir", default="/tpenv/auth")
    p.add_argument("--mounts", default="/tpenv/mounts")
    p.add_argument("--lease", type=float, default=5.0, help="seconds without a ping before intercepts end")
    p.add_argument("--bind-host", default="0.0.0.0", help="address of the agent ports")
    p.add_argument("--app-host", default="127.0.0.1", help="where the app listens")
    p.add_argument("--mount", action="append", default=None, metavar="PATH",
                   help="an app mount path (default: the mount points found under --mounts)")
    p.add_argument("--image-env", default=os.environ.get("TPENV_IMAGE_ENV", envreport.DEFAULT_IMAGE_ENV),
                   help="JSON list of the agent image's own variable names")
    p.add_argument("--sniff-timeout", type=float, default=2.0,
                   help="seconds to wait for a caller's first bytes on a port with header intercepts")
    p.add_argument("--h2-passthrough", choices=("route", "raw"), default="route",
                   help="route: h2c connections always go through the per-stream router, so intercepts "
                        "started later see streams of long-lived (gRPC) connections; raw: splice them")
    # switch by default (issue #13): raw splices cost the agent least, and a keep-alive connection
    # opened before an intercept still has its next request intercepted (issue #11).
    p.add_argument("--http1-passthrough", choices=("switch", "route", "raw"), default="switch",
                   help="switch (default): HTTP/1.x connections are spliced raw while the port has no "
                        "intercept; when one starts, each such connection moves to per-request routing at "
                        "its next request (caller bytes after the app's answer; never after a 101 upgrade; "
                        "a client that pipelines a request before the previous answer ends is not supported "
                        "then); route: parse every request always; raw: splice them for good (keep-alive "
                        "ones stay with the app)")
    p.add_argument("--api-server", default=None,
                   help="the API server's URL, to verify sessions' users (default: the in-cluster one)")
    p.add_argument("--api-ca", default=None, help="its CA file (default: the pod's service-account ca.crt)")
    p.add_argument("--restore", default=None, metavar="DIR",
                   help="replace mode: the restore Secret's directory; the agent restores the workload itself "
                        "when its intercepts end and nobody takes them again (restorer.py)")
    p.add_argument("--restore-grace", type=float, default=20.0,
                   help="seconds without any intercept before --restore applies")
    p.add_argument("--log-level", default="info")
    return p


class Sidecar:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.container = args.container
        self.lease = args.lease
        self.app_host = args.app_host
        self.sniff_timeout = args.sniff_timeout
        self.h2_always = args.h2_passthrough == "route"
        self.h1_always = args.http1_passthrough == "route"
        self.h1_switch = args.http1_passthrough == "switch"
        self.mounts_root = os.path.abspath(args.mounts)
        self.pod = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()
        self.namespace = os.environ.get("POD_NAMESPACE") or _sa_namespace()
        self.registry = Registry(list(args.listen))
        self.probes = ProbeRecord()  # route probes seen by the listeners (routeprobe.py)
        self.kubelet = KubeletPeers()  # where the kubelet's probes come from (kubelet.py)
        # Intercepts take nothing before the kubelet's first probe: its probes of the app's
        # ports could not be told apart yet (kubelet.py).
        self.registry.taking = lambda: len(self.kubelet) > 0
        # Intercepts ended because their client vanished, until the next intercept (control.py).
        self.abandoned: list[dict[str, Any]] = []
        self.api = ApiServer(args.api_server, args.api_ca)
        self.ssh_conns: dict[Any, Any] = {}
        self.ready = asyncio.Event()
        self.log = logs.unit("sidecar", self.container)
        self._image_env = envreport.load_image_env(args.image_env)
        self._listeners: list[PortListener] = []
        self._ssh: Any = None
        self.stream_port: StreamPort | None = None
        self._health: HealthServer | None = None
        self._closed = asyncio.Event()
        self.restorer: Restorer | None = None
        if args.restore:
            self.restorer = Restorer(self.registry, args.restore, grace=args.restore_grace)

    async def __aenter__(self) -> "Sidecar":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()

    async def start(self) -> dict[str, Any]:
        # Health first, so /livez answers while the rest comes up.
        health_port = None
        if self.args.health is not None:
            self._health = HealthServer(*self.args.health, self.ready, self.kubelet)
            health_port = await self._health.start()
        bound = {}
        specs = []
        for spec in self.registry.ports:
            lst = PortListener(self, spec, self.args.bind_host)
            port = await lst.start()
            self._listeners.append(lst)
            # Record the bound port (port 0 in tests); listeners route by the same object.
            real = PortSpec(port, spec.app_port, spec.name)
            lst.spec = real
            specs.append(real)
            bound[spec.name] = port
        self.registry.ports[:] = specs
        self._ssh = await sshd.start(self, *self.args.ssh, self.args.auth_dir)
        ssh_port = self._ssh.sockets[0].getsockname()[1]
        if self.args.streams[0] != "off":
            port = StreamPort(sftp_factory=lambda chan: ConfinedSFTPServer(chan, self.mounts_root))
            try:
                await port.start(*self.args.streams)
                self.stream_port = port
            except OSError as e:  # a fast path only: SSH channels carry everything without it
                self.log.warning("stream port %s:%d not bound (%s): intercepted connections go over SSH only",
                                 *self.args.streams, e)
        if self.restorer is not None:
            self.restorer.start()
        self.ready.set()
        self.log.info("ready: %d listener(s), ssh and health up", len(bound))
        return {"ready": True, "ssh": ssh_port, "health": health_port, "listeners": bound,
                "streams": self.stream_port.port if self.stream_port is not None else None}

    def app_env(self) -> dict[str, str]:
        return envreport.app_env(self._image_env)

    def mount_paths(self) -> list[str]:
        if self.args.mount is not None:
            return list(self.args.mount)
        root = self.mounts_root.rstrip("/") + "/"
        found = []
        try:
            with open("/proc/self/mountinfo", encoding="utf-8") as f:
                for line in f:
                    point = line.split()[4].replace("\\040", " ")
                    if point.startswith(root):
                        found.append("/" + point[len(root):])
        except OSError:
            pass
        return sorted(set(found))

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self.restorer is not None:
            self.restorer.close()
        for lst in self._listeners:
            lst.close()
        if self._ssh is not None:
            self._ssh.close()
        if self.stream_port is not None:
            self.stream_port.close()
        if self._health is not None:
            self._health.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self.restorer is not None:
            await self.restorer.wait_closed()
        for lst in self._listeners:
            await lst.wait_closed()
        if self._ssh is not None:
            await self._ssh.wait_closed()
        if self.stream_port is not None:
            await self.stream_port.wait_closed()
        if self._health is not None:
            await self._health.wait_closed()


def _sa_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return "default"


async def run_sidecar(argv: list[str], loop: tuple[str, str | None] | None = None,
                      sched: str | None = "not started by tpenv-agent's main") -> int:
    """``loop``: the event loop main() chose and why it is not uvloop (None when it is);
    by default, named after the running loop. ``sched``: why the CPU policy main() set is not
    SCHED_BATCH (main.cpu_policy), None when it is."""
    args = parser().parse_args(argv)
    logs.setup(args.log_level)
    if loop is None:
        uv = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        loop = ("uvloop", None) if uv else ("asyncio", "not started by tpenv-agent's main")
    name, why_not = loop
    if why_not is None:
        logs.unit("sidecar", args.container).info("event loop: %s", name)
    else:
        # Works the same, at about 1.4 times the agent's CPU per passthrough request.
        logs.unit("sidecar", args.container).warning("event loop: %s (%s)", name, why_not)
    if sched is None:
        logs.unit("sidecar", args.container).info("cpu policy: batch")
    elif sched == f"{SCHED_ENV}=normal":  # asked for: main.cpu_policy's reason for that choice
        logs.unit("sidecar", args.container).info("cpu policy: normal (%s)", sched)
    else:
        # Works the same; on a CPU shared with the app, at about half HAProxy's req/s (main.cpu_policy).
        logs.unit("sidecar", args.container).warning("cpu policy: normal (%s)", sched)
    if not args.listen:
        print("tpenv-agent sidecar: at least one --listen is needed", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sidecar = Sidecar(args)
    try:
        info = await sidecar.start()
    except Exception as e:  # a missing auth dir, a bad key, a port in use: one clear line, exit 1
        sidecar.log.error("cannot start: %s: %s", type(e).__name__, e)
        sidecar.close()
        return 1
    print(json.dumps(info), flush=True)
    await stop.wait()
    sidecar.log.info("stopping")
    sidecar.close()
    await sidecar.wait_closed()
    return 0
