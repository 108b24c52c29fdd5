"""tpenv intercept: a workload port's traffic to a local port, with the app's env and volumes.

A one-unit run of the reconciler machinery (tpenv.engine.intercepts.InterceptRun): inject the
agent if needed, keep a tunnel to every ready replica, read the env and mount the volumes, then
run ``-- CMD ARGS`` with that env (the intercept ends when it exits) or hold until Ctrl-C or
``tpenv leave NAME`` from another shell.

Connected (``--connect MODE``, or the file's ``connect:`` section): as ``telepresence intercept``
runs within a ``telepresence connect``, CMD then sees the cluster the pod sees: the pod's
``DB_HOST=db`` reaches the ``db`` Service of the workload's namespace (short names are looked up
there first), through the mode's capture (docs/connect.md, "tpenv intercept").
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from tpenv.config.env import write_env_file
from tpenv.config.flags import DEFAULT_PORT, intercept_from_flags
from tpenv.config.models import Intercept
from tpenv.engine.intercepts import InterceptRun
from tpenv.engine.localenv import command_env
from tpenv.engine.session import publish_session
from tpenv.errors import ConfigError, MissingTool, UsageError
from tpenv.kits.kube import Kube

HELP = "Send a workload port's traffic (all of it, or matching HTTP requests) to a local port."



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", metavar="WORKLOAD",
                        help="NAME, deployment/NAME, statefulset/NAME or replicaset/NAME")
    parser.add_argument("--port", metavar="L[:R]", default=DEFAULT_PORT,
                        help=f"local port, and the service port (name or number) taken over (default: {DEFAULT_PORT})")
    parser.add_argument("--name", metavar="NAME", help="name of the intercept (default: the workload's name)")
    parser.add_argument("--service", metavar="NAME", help="the service, when several select the workload")
    parser.add_argument("--container", metavar="NAME", help="the app container, when the port leaves a doubt")
    parser.add_argument("--http-header", action="append", default=[], metavar="K=V",
                        help="only requests whose header K matches regex V (repeatable); 'auto': your personal "
                             "header; 'all': every connection (also where the cluster's manager runs in team mode, "
                             "which makes 'auto' the default)")
    path = parser.add_mutually_exclusive_group()
    path.add_argument("--http-path-prefix", metavar="P", help="only requests whose path starts with P")
    path.add_argument("--http-path-equal", metavar="P", help="only requests whose path is P")
    path.add_argument("--http-path-regex", metavar="RE", help="only requests whose path matches RE")
    parser.add_argument("--mirror", action="store_true",
                        help="the app keeps answering every request; this machine gets a copy of each matched "
                             "HTTP/1.x request, its answers discarded (Telepresence's wiretap)")
    parser.add_argument("--force", action="store_true",
                        help="take the port over from another user's all-TCP intercept, which ends (needs the "
                             "RBAC verb force on intercepts.tpenv.io in the namespace)")
    parser.add_argument("--replace", action="store_true",
                        help="the app container stops running in the cluster while the intercept lasts; every one "
                             "of its ports comes here (Telepresence's replace); it comes back on leave, Ctrl-C, or "
                             "by itself when this machine is gone")
    parser.add_argument("--env-file", metavar="F", help="write the app's environment to F")
    parser.add_argument("--env-syntax", choices=("docker", "sh", "json", "compose"), default="docker",
                        help="syntax of --env-file (default: docker)")
    parser.add_argument("--env-json", metavar="F", help="write the app's environment to F as JSON")
    parser.add_argument("--mount", metavar="DIR|true|false", default=None,
                        help="mount the app's volumes at DIR (true: a temporary directory; false: no mount). "
                             "Not given: a temporary directory when sshfs and FUSE are here, else no mount (said once)")
    parser.add_argument("--mount-mode", choices=("auto", "sshfs", "sync"), default=None,
                        help="sshfs: a live FUSE mount; sync: a local copy kept in step both ways (no FUSE needed); "
                             "auto (default): sshfs, or an error saying what is missing")
    parser.add_argument("--rewrite-env", action="append", default=[], metavar="NAME",
                        help="prefix this path-valued variable with the mount root (repeatable; e.g. "
                             "AWS_WEB_IDENTITY_TOKEN_FILE)")
    parser.add_argument("--docker-run", action="store_true",
                        help="the command is `IMAGE ARGS`: run it with `docker run` (or podman), the env file, "
                             "mounts and port")
    parser.add_argument("--connect", choices=("auto", "host", "ns", "env", "off"), default=None, metavar="MODE",
                        help="run CMD connected to the cluster, so the pod's names (DB_HOST=db) reach its Services: "
                             "auto (host with root, else ns, else env), host, ns, env, or off. Default: the mode of "
                             "the file's connect: section, else off (see docs/connect.md)")
    parser.add_argument("--ready-timeout", type=float, default=60.0, metavar="S",
                        help="seconds to wait for the tunnels once the agent runs (default: 60)")
    parser.add_argument("command", nargs="*", metavar="-- CMD ARGS",
                        help="run CMD with the intercept's env; the intercept ends when it exits")


def describe_text(d: dict) -> str:
    rows = [("Intercept name", d["name"]), ("State", d["state"]), ("Workload kind", d["workload_kind"]),
            ("Destination", d["destination"]), ("Service Port Identifier", d["service_port"]),
            ("Volume Mount Point", d["mount_point"] or "(none)"),
            ("Mode", d.get("mode", "intercept") + {"mirror": " (copies; the app answers)",
                                                   "replace": " (the app container is stopped; every port here)"}
             .get(d.get("mode"), "")),
            ("Intercepting", intercepting_text(d["match"]) + (" (team mode default)" if d.get("team_mode_default")
                                                              else ""))]
    width = max(len(k) for k, _ in rows)
    return "intercepted\n" + "\n".join(f"    {k:<{width}}: {v}" for k, v in rows)


def intercepting_text(match: dict | None) -> str:
    if not match:
        return "all TCP connections"
    parts = [f"header({k!r}) ~ /{v}/" for k, v in (match.get("headers") or {}).items()]
    for kind, value in (match.get("path") or {}).items():
        parts.append(f"path {kind} {value!r}")
    return "HTTP requests that match all of: " + ", ".join(parts)


def container_engine(environ: dict[str, str] | None = None) -> str:
    """The program --docker-run runs (podman takes the same `run` flags): docker when its daemon
    can be reached (DOCKER_HOST, or its socket), else podman (daemonless), else docker anyway so
    that its own error says what is missing."""
    environ = os.environ if environ is None else environ
    docker, podman = shutil.which("docker"), shutil.which("podman")
    if docker and (environ.get("DOCKER_HOST") or os.path.exists("/var/run/docker.sock")):
        return docker
    found = podman or docker
    if not found:
        raise MissingTool("--docker-run needs a container engine: neither docker nor podman is installed",
                          hint="install one (Debian/Ubuntu: apt-get install podman, or docker.io)")
    return found


def docker_argv(args: argparse.Namespace, env_file: str, mount_point: str | None, mounts: list[str],
                local_port: int, engine: str = "docker", *, name: str | None = None) -> list[str]:
    argv = [engine, "run", "--rm", "--env-file", env_file, "-p", f"{local_port}:{local_port}"]
    if name:
        argv += ["--name", name]  # so that stopping the intercept can stop the container
    if mount_point:
        for m in mounts:
            argv += ["-v", f"{mount_point.rstrip('/')}{m}:{m}"]
    return argv + list(args.command)


def connect_section(args: argparse.Namespace, ctx) -> Any:
    """The ``connect:`` settings CMD runs under, or None (not connected): ``--connect MODE`` over
    the file's section; a section of a file that does not load does not apply (said by
    apply_project_agent already)."""
    from tpenv.config.models import Connect

    section = None
    if ctx.config_file.is_file():
        with contextlib.suppress(ConfigError):
            config = ctx.load_config()
            if "connect" in config.model_fields_set:
                section = config.connect
    mode = args.connect or (section.capture if section is not None else "off")
    if mode == "off":
        return None
    if not args.command:
        if args.connect:
            raise UsageError("--connect needs `-- CMD`: it is CMD that runs connected",
                             hint="for this whole machine, run `tpenv connect` in another shell")
        return None
    if args.docker_run:
        raise UsageError("--docker-run cannot run connected: the container has its own network",
                         hint="drop --connect (or set connect: mode off), or run `sudo tpenv connect` (host mode) "
                              "next to it")
    return (section or Connect()).model_copy(update={"mode": mode})


async def run(args: argparse.Namespace, ctx) -> int:
    intercept = intercept_from_flags(args)
    if args.docker_run and not args.command:
        raise UsageError("--docker-run needs `-- IMAGE [ARGS]`")
    connect = connect_section(args, ctx)
    if args.docker_run:
        container_engine()  # before any change in the cluster
    say = (lambda text: print(text, file=sys.stderr, flush=True))
    ctx.apply_project_agent(lambda text: say(f"warning: {text}"))
    async with await Kube.load(context=ctx.cluster_context()) as kube:
        namespace = ctx.namespace or intercept.namespace or kube.namespace
        from tpenv.engine.statusd import new_session_id

        session_id = new_session_id()
        irun = InterceptRun(kube, intercept, namespace, session_id, ctx.settings, progress=say,
                            env_json=args.env_json, container=args.container)
        await irun.resolve()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            async with publish_session(ctx.settings, session_id, irun.snapshot, stop.set, irun.env_of), irun:
                waiting = asyncio.ensure_future(irun.wait_ready(args.ready_timeout))
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not waiting.done():
                    waiting.cancel()
                    return 130
                waiting.result()
                desc = irun.describe()
                ctx.emit(describe_text(desc), desc)
                if not args.command and not await _listening(intercept.port.local):
                    say(f"note: nothing listens on 127.0.0.1:{intercept.port.local} yet; until something does, "
                        f"intercepted connections go to the app in the cluster")
                unit = irun.env_unit()
                assert unit is not None
                if not args.command:
                    await stop.wait()
                    return 0
                if connect is None:
                    return await _run_command(args, intercept, unit, stop)
                return await _run_connected(args, intercept, unit, stop, kube, connect, namespace, say)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


async def _run_command(args: argparse.Namespace, intercept: Intercept, unit, stop: asyncio.Event) -> int:
    env = command_env(unit.env)
    tmp_env: str | None = None
    argv = list(args.command)
    engine = container = None
    if args.docker_run:
        fd, tmp_env = tempfile.mkstemp(prefix="tpenv-", suffix=".env")
        os.close(fd)
        write_env_file(unit.env, tmp_env, "docker")
        engine, container = container_engine(), f"tpenv-{intercept.name}-{os.getpid()}"
        argv = docker_argv(args, tmp_env, str(unit.mount_point) if unit.mount_point else None, unit.mounts,
                           intercept.port.local, engine, name=container)
        # The app's environment reaches the container through --env-file; the engine itself runs
        # with this machine's (its DOCKER_HOST, CONTAINERS_CONF, XDG_RUNTIME_DIR...), not the pod's.
        env = dict(os.environ)
    try:
        try:
            proc = await asyncio.create_subprocess_exec(*argv, env=env)
        except OSError as e:
            raise UsageError(f"cannot run {argv[0]!r}: {e.strerror or e}") from e
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not waiter.done():
            if engine and container:
                # A container's PID 1 ignores SIGINT unless it handles it: the engine's own stop
                # (SIGTERM, then SIGKILL after 5 s) is what ends a container for sure.
                stopping = await asyncio.create_subprocess_exec(engine, "stop", "-t", "5", container, env=env,
                                                                stdout=asyncio.subprocess.DEVNULL,
                                                                stderr=asyncio.subprocess.DEVNULL)
                await stopping.wait()
            else:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await waiter
        return proc.returncode if proc.returncode is not None and proc.returncode >= 0 else 128 - (proc.returncode or 0)
    finally:
        if tmp_env:
            Path(tmp_env).unlink(missing_ok=True)


async def _run_connected(args: argparse.Namespace, intercept: Intercept, unit, stop: asyncio.Event, kube: Kube,
                         connect: Any, namespace: str, say: Any) -> int:
    """CMD connected (--connect): the pod's env as the mode needs it, CMD's intercept port
    reachable from this machine's loopback (ns mode), stopped by Ctrl-C / `tpenv leave`."""
    from tpenv.engine.outbound.session import connected

    async with connected(kube, connect, namespace, {}, search_first=[namespace]) as conn:
        say(f"connected: mode {conn.choice.mode}: {conn.choice.why}")
        env = command_env(await conn.env_for(dict(unit.env), namespace))
        running = await conn.start(list(args.command), env, inbound=[intercept.port.local])
        waiter = asyncio.ensure_future(running.wait())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                return await running.stop()
            return waiter.result()
        finally:
            stopper.cancel()
            if not waiter.done():
                await running.stop()


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
