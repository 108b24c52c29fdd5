"""``tpenv connect`` and ``tpenv quit`` as functions the verbs call.

- ``tpenv connect``: a background session (``tpenv connect --foreground`` detached, its log in
  the state directory) running the connect unit under the reconciler, so it heals like ``tpenv
  up`` and answers ``tpenv status``; the verb returns once it is connected (or says why not).
- ``tpenv connect -- CMD``: the core and a capture for one command, in this process; the
  command's exit status is tpenv's.
- ``tpenv quit``: stops the background sessions ("Disconnected").
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tpenv.config.models import Config
from tpenv.engine.outbound.core import OutboundCore
from tpenv.engine.outbound.envmode import EnvCapture
from tpenv.engine.outbound.modes import choose
from tpenv.engine.outbound.unit import ConnectSpec, connect_options, start_capture
from tpenv.errors import ConfigError, NotFound, PermanentError, TpenvError, UsageError
from tpenv.kits.kube import Kube
from tpenv.settings import Settings

SESSION_PREFIX = "connect-"


async def check_namespaces(kube: Kube, config: Config, flags: dict[str, Any]) -> None:
    """Every mapped namespace exists: a located error (the flag, or file:line:column) otherwise."""
    from_flag = bool(flags.get("mapped_namespaces"))
    names = list(flags.get("mapped_namespaces") or config.connect.mapped)
    field = "mapped_namespaces" if config.connect.mapped_namespaces is not None else "namespaces"
    problems = []
    for i, ns in enumerate(names):
        try:
            await kube.require_namespace(ns)
        except NotFound:
            if from_flag:
                raise UsageError(f"--mapped-namespaces {ns}: no such namespace in the cluster",
                                 hint="`kubectl get namespaces` lists them") from None
            locator = getattr(config, "_locator", None)
            if locator is None:
                raise UsageError(f"connect.{field}: no namespace {ns!r} in the cluster") from None
            problems.append(locator.problem(("connect", field, i), f"no namespace {ns!r} in the cluster",
                                            "`kubectl get namespaces` lists them"))
    if problems:
        raise ConfigError(problems)


def connect_spec(kube: Kube, config: Config, namespace: str, flags: dict[str, Any], **kw: Any) -> ConnectSpec:
    return ConnectSpec(kube, config.connect, namespace, flags=tuple(sorted((k, _freeze(v)) for k, v in flags.items())),
                       **kw)


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


async def run_foreground(config: Config, config_path: Path, settings: Settings, kube_context: str | None,
                         flags: dict[str, Any], ready_fd: int | None) -> int:
    """The background session itself: the connect unit under the reconciler until quit/Ctrl-C.
    ``ready_fd`` gets one JSON line: connected (with what to print) or the error."""
    from tpenv.engine.up import run_up

    kube = await Kube.load(context=kube_context)
    namespace = config.namespace or kube.namespace
    units: dict[str, Any] = {}

    def report(answer: dict[str, Any]) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, json.dumps(answer).encode() + b"\n")
                os.close(ready_fd)
            ready_fd = None

    def on_ready(unit: Any) -> None:
        units["unit"] = unit
        report({"ok": True, "context": kube_context or kube.context or "(current)", "namespace": namespace,
                "url": kube.host, "mode": unit.choice.mode, "why": unit.choice.why})

    def on_failed(e: BaseException) -> None:
        if ready_fd is None:
            return  # a later failure: the reconciler retries, status shows it
        report({"ok": False, "error": str(e), "hint": getattr(e, "hint", None),
                "exit": getattr(e, "exit_code", 1), "kind": type(e).__name__})
        os.kill(os.getpid(), signal.SIGTERM)  # nothing connected: end the session

    spec = connect_spec(kube, config, namespace, flags, on_ready=on_ready, on_failed=on_failed, context=kube_context)
    try:
        return await run_up(config_path, settings, unit_factory=lambda _c, _u: {spec.key: spec},
                            session_id=SESSION_PREFIX + os.urandom(4).hex(), load=lambda _p: config,
                            extra_status=lambda: {"connection": units["unit"].snapshot} if units else {})
    finally:
        await kube.close()


async def start_background(argv: list[str], state_dir: Path, timeout: float = 120.0) -> dict[str, Any]:
    """Start ``tpenv connect --foreground`` detached; its first JSON line (connected, or why not)."""
    state_dir = state_dir.expanduser()
    state_dir.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    log = open(state_dir / "connect.log", "ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tpenv.cli.main", "connect", *argv, "--foreground",
                                 "--ready-fd", str(write_fd)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                pass_fds=(write_fd,), start_new_session=True)
    finally:
        os.close(write_fd)
        log.close()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb"))
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError:
        line = b""
    finally:
        transport.close()
    if not line:
        code = proc.poll()
        raise PermanentError(f"the connect session {'exited with ' + str(code) if code is not None else 'did not start'}"
                             f" before it was connected", hint=f"its log: {state_dir / 'connect.log'}")
    answer = json.loads(line)
    answer["pid"] = proc.pid
    return answer


def raise_reported(answer: dict[str, Any]) -> None:
    """The background session's start error, raised here with its exit code."""
    e = TpenvError(answer.get("error") or "connect failed", hint=answer.get("hint"))
    e.exit_code = int(answer.get("exit") or 1)
    raise e


class Connected:
    """The core and its capture for one command (``connected()``): the command's env, and the
    command started under the capture (ns mode: in its own namespaces)."""

    def __init__(self, choice: Any, core: OutboundCore, capture: Any) -> None:
        self.choice, self.core, self.capture = choice, core, capture

    async def env_for(self, env: dict[str, str], namespace: str) -> dict[str, str]:
        """env mode: proxy variables, and the values naming Services of ``namespace`` pointed at
        their port maps; other modes: as is (the capture makes the names work)."""
        if isinstance(self.capture, EnvCapture):
            return await self.capture.env_for(env, namespace)
        return dict(env)

    async def start(self, argv: list[str], env: dict[str, str], *, inbound: list[int] = (),
                    cwd: str | None = None) -> "Running":
        """``argv`` started connected. ``inbound``: local ports the command listens on that
        must be reachable from this machine's loopback (an intercept's port; ns mode)."""
        if self.choice.mode == "ns":
            from tpenv.kits.capture_ns import NsCommand

            # The cluster's search list, as a pod's resolv.conf has it, so bare names resolve in
            # the command exactly as they do in the connected namespace's pods.
            ns = NsCommand(argv, self.core.cidrs, self.core.on_connection, dns=self.core.resolver_address,
                           search=self.core.search_list, env=env, cwd=cwd, inbound=inbound)
            return Running(asyncio.ensure_future(ns.run()), ns.send_signal)
        try:
            proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=cwd)
        except OSError as e:
            raise UsageError(f"cannot run {argv[0]!r}: {e.strerror or e}") from e
        return Running(asyncio.ensure_future(proc.wait()), proc.send_signal)


class Running:
    """A started command: ``wait()`` its exit status (128+N for a signal), ``stop()`` it."""

    def __init__(self, task: "asyncio.Future[int]", signal_fn: Any) -> None:
        self.task, self._signal = task, signal_fn

    async def wait(self) -> int:
        code = await asyncio.shield(self.task)
        return code if code >= 0 else 128 - code

    async def stop(self, grace: float = 5.0) -> int:
        """SIGINT, then SIGKILL after ``grace`` seconds."""
        for sig in (signal.SIGINT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                self._signal(sig)
            try:
                return await asyncio.wait_for(self.wait(), grace)
            except asyncio.TimeoutError:
                continue
        return await self.wait()


@contextlib.asynccontextmanager
async def connected(kube: Kube, connect: Any, namespace: str, flags: dict[str, Any], *,
                    search_first: list[str] = ()) -> Any:
    """Connected for one command: the mode chosen (``flags["mode"]``, else ``connect.mode``),
    the core up, the capture in place; all of it gone on exit."""
    choice = choose(flags.get("mode") or connect.mode, command=True)
    options = connect_options(connect, namespace, search_first=list(search_first), flags=flags, mode=choice.mode)
    async with contextlib.AsyncExitStack() as stack:
        core = await stack.enter_async_context(OutboundCore(kube, options))
        capture = await start_capture(choice, core, stack)
        yield Connected(choice, core, capture)


async def run_command(config: Config, kube: Kube, flags: dict[str, Any], command: list[str], say: Any) -> int:
    """``tpenv connect -- CMD``: connected for the lifetime of one command; its exit status."""
    namespace = config.namespace or kube.namespace
    async with connected(kube, config.connect, namespace, flags) as conn:
        say(f"Connected to context {kube.context or '(current)'}, namespace {namespace} ({kube.host}); "
            f"mode {conn.choice.mode}: {conn.choice.why}")
        running = await conn.start(command, await conn.env_for(dict(os.environ), namespace))
        try:
            return await running.wait()
        except asyncio.CancelledError:
            await running.stop()
            raise


__all__ = ["check_namespaces", "run_foreground", "start_background", "run_command", "raise_reported", "connected",
           "Connected", "Running", "SESSION_PREFIX"]
