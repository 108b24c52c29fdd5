"""`tpenv up`, `down` and `status` as functions the CLI verbs call.

``run_up`` loads the config, publishes the session (statusd), watches the config file, and
runs the :class:`Reconciler` over the units a *unit factory* derives from the config, until
Ctrl-C / SIGTERM / `tpenv down`. A second Ctrl-C aborts: handler groups get SIGKILL and
tpenv exits at once (in the cluster, the agents' leases end the intercepts).

The unit factory is where the engines plug in::

    def units(config: Config, ctx: UpContext) -> Mapping[Key, UnitSpec]   # or async

It is called at every reconcile pass with the freshly loaded config; ``ctx.notify`` feeds
events (e.g. kube watch events) to the loop, and ``ctx.resources`` (an AsyncExitStack) holds
long-lived helpers (watches, clients) until the session ends. ``local_units`` is the factory
for handlers alone; the full factory adds intercept/tunnel/forward specs and gives handlers
their env and dependency through ``handler_specs(config, ctx, env_for=..., depends_on=...)``.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpenv.engine.handlers import EnvFn, HandlerSpec
from tpenv.engine.reconciler import Reconciler
from tpenv.engine.statusd import StatusServer, find_sessions, new_session_id, request_down, request_status
from tpenv.engine.units import Key, UnitEvent, UnitSpec, hash_spec
from tpenv.engine.watcher import FileWatcher
from tpenv.errors import NotFound, UsageError
from tpenv.kits.aio import DaemonExecutor, unit_logger
from tpenv.settings import Settings

EXIT_FORCED = 130
FORCE_EXIT_AFTER = 2.0  # seconds between a second Ctrl-C and the exit, whatever still runs


def shutdown_grace(settings: Settings) -> float:
    """The bound of one Ctrl-C with no request in flight (docs/reconciler.md, "Stopping"): the
    handler's staged stop, a mount's two unmount steps, a tunnel's leave and close. A request
    being answered at that moment is given up to ``tunnels.leave_drain`` more to finish."""
    from tpenv.engine.tunnels import CLOSE_WAIT, LEAVE_ANSWER  # here: the kube kit is heavy to import

    h, m = settings.handlers, settings.mounts
    return h.stop_grace + h.term_grace + 2 * m.unmount_timeout + LEAVE_ANSWER + CLOSE_WAIT


def _hard_exit() -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write("\x1b[?25h" if sys.stderr.isatty() else "")  # the live table hid the cursor
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(EXIT_FORCED)


@dataclass
class UpContext:
    """What a unit factory gets besides the config."""

    session_id: str
    settings: Settings  # tpenv.settings.Settings
    only: frozenset[str]
    notify: Callable[[UnitEvent], None]
    resources: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    def wanted(self, name: str | None) -> bool:
        """``--only`` filter: everything when empty."""
        return not self.only or name in self.only


UnitFactory = Callable[[Any, UpContext], "Mapping[Key, UnitSpec] | Awaitable[Mapping[Key, UnitSpec]]"]


def static_env(intercept: Any) -> EnvFn:
    """The env a handler gets without a cluster: the config's ``env.set`` only."""
    values = dict(intercept.env.set)
    return lambda: values


def handler_specs(
    config: Any,
    ctx: UpContext,
    *,
    env_for: Callable[[Any], EnvFn] = static_env,
    depends_on: Callable[[Any], frozenset[Key]] = lambda intercept: frozenset(),
    wrap_for: Callable[[Any], Any] = lambda intercept: None,
) -> dict[Key, HandlerSpec]:
    """A handler spec for every wanted intercept with ``run:``.

    ``env_for(intercept)`` returns the callable giving the fresh env at each start (the
    intercept engine's rendered env); ``depends_on(intercept)`` the keys the handler waits
    for (e.g. its intercept's key); ``wrap_for(intercept)`` what starts its argv (None: as is).
    The handler restarts when its ``run:`` or ``env:`` changes.
    """
    base = config.source.parent if config.source else Path.cwd()
    specs: dict[Key, HandlerSpec] = {}
    for ic in config.intercepts:
        if ic.run is None or not ctx.wanted(ic.name):
            continue
        spec = HandlerSpec.from_run(ic.name, ic.run, base, ctx.settings, env=env_for(ic),
                                    env_version=hash_spec(ic.env.model_dump(mode="json")),
                                    depends_on=frozenset(depends_on(ic)), exclude=tpenv_outputs(config, base),
                                    wrap=wrap_for(ic))
        specs[spec.key] = spec
    return specs


def tpenv_outputs(config: Any, base: Path) -> tuple[str, ...]:
    """What tpenv itself writes near the config, for every intercept (a handler's cwd may hold
    another intercept's outputs): mount directories and env files. A handler's watcher never
    enters them: a save there is the pod's or tpenv's, not the developer's (issue #19)."""
    out: list[str] = []
    for ic in config.intercepts:
        if isinstance(ic.mount.path, str):
            out.append(str((base / ic.mount.path).absolute()))
        if ic.env.file:
            out.append(str((base / ic.env.file).absolute()))
    return tuple(sorted(set(out)))


def local_units(config: Any, ctx: UpContext) -> dict[Key, HandlerSpec]:
    """The unit factory for local handlers only (no cluster)."""
    return handler_specs(config, ctx)


def _check_only(config: Any, only: Sequence[str]) -> None:
    names = {ic.name for ic in config.intercepts} | {f.service for f in config.forwards}
    unknown = sorted(set(only) - names)
    if unknown:
        raise UsageError(f"--only {', '.join(unknown)}: no intercept or forward of that name in "
                         f"{config.source or 'the config'}", hint="known: " + (", ".join(sorted(names)) or "none"))


async def run_up(
    config_path: str | Path,
    settings: Settings,
    *,
    only: Sequence[str] = (),
    unit_factory: UnitFactory = local_units,
    session_id: str | None = None,
    load: Callable[[Path], Any] | None = None,
    view: Callable[[Callable[[], dict[str, Any]]], contextlib.AbstractAsyncContextManager] | None = None,
    extra_status: Callable[[], dict[str, Any]] | None = None,
    env_of: Callable[[str], dict[str, str] | None] | None = None,
) -> int:
    """Run a session until Ctrl-C, SIGTERM or `tpenv down`. Returns 0 after a clean stop,
    130 after a forced one; raises ConfigError/UsageError when the config is wrong at start
    (later invalid edits are reported and the running state is kept)."""
    if load is None:
        from tpenv.config import load_config as load
    config_path = Path(config_path).resolve()
    log = unit_logger("up", config_path.name)
    first = load(config_path)  # wrong at start: no session, the CLI prints the problems
    _check_only(first, only)
    session_id = session_id or new_session_id()
    loaded: dict[str, Any] = {"config": first}

    rec: Reconciler
    ctx: UpContext

    async def desired() -> Mapping[Key, UnitSpec]:
        # A fresh load at every pass: a pass is rare (debounced), and this keeps one truth.
        config = loaded.pop("config", None) or load(config_path)
        return await _maybe_await(unit_factory(config, ctx))

    h = settings.handlers
    rec = Reconciler(desired, debounce=h.debounce, restart_initial=h.restart_initial, restart_max=h.restart_max,
                     name=session_id)
    ctx = UpContext(session_id, settings, frozenset(only), rec.notify)
    forced = asyncio.Event()

    def on_signal(signum: int) -> None:
        if not rec.stopping:
            log.info("%s: stopping everything (again to force)", signal.Signals(signum).name)
            rec.request_stop()
        elif not forced.is_set():
            log.warning("forced: killing handlers now; the agents' leases end the intercepts")
            # A thread, not the loop: whatever might still hold the loop (or asyncio.run's
            # teardown) cannot hold the exit. abort() below already killed and unmounted.
            timer = threading.Timer(FORCE_EXIT_AFTER, _hard_exit)
            timer.daemon = True  # a quicker clean exit does not wait for it
            timer.start()
            rec.abort()
            forced.set()

    loop = asyncio.get_running_loop()
    # Blocking calls in threads (API requests, DNS) must not hold the exit after a stop.
    loop.set_default_executor(DaemonExecutor())
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(ctx.resources)
            def snapshot() -> dict[str, Any]:
                # Units the engines keep inside theirs (an intercept's mount) come as extra rows.
                snap, extra = rec.snapshot(), dict(extra_status() if extra_status else {})
                rows = list(extra.pop("units", []))
                return {**snap, **extra, "units": snap["units"] + rows}

            await stack.enter_async_context(StatusServer(
                snapshot=snapshot, on_down=rec.request_stop, state_dir=settings.session.state_dir,
                session_id=session_id, config=config_path, env_of=env_of))
            await stack.enter_async_context(FileWatcher(
                config_path.parent, [config_path.name], on_change=lambda _: rec.notify(UnitEvent("config")),
                debounce=h.debounce, name=config_path.name, recursive=False))
            if view is not None:  # e.g. the live table in a terminal (liveview.py)
                await stack.enter_async_context(view(snapshot))
            log.info("session %s: %s", session_id, config_path)
            running = asyncio.create_task(rec.run(), name="reconciler/run")
            aborting = asyncio.create_task(forced.wait())
            try:
                await asyncio.wait({running, aborting}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                aborting.cancel()
                if forced.is_set():
                    running.cancel()
                await asyncio.wait({running})
            if forced.is_set():
                return EXIT_FORCED
            if running.exception() is not None:
                raise running.exception()  # type: ignore[misc]
        log.info("stopped")
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _maybe_await(value: Any) -> Any:
    return await value if isinstance(value, Awaitable) else value


def _pick(state_dir: Path, session_id: str | None) -> list:
    sessions = find_sessions(state_dir)
    if session_id:
        sessions = [s for s in sessions if s.id == session_id]
    if not sessions:
        raise NotFound("no tpenv up session is running" + (f" with id {session_id}" if session_id else ""),
                       hint="start one with `tpenv up`")
    return sessions


async def run_down(settings: Settings, *, session_id: str | None = None, wait: float = 60.0) -> list[str]:
    """Stop every running session (or the one with ``session_id``) and wait until each has
    stopped; returns the ids stopped. NotFound when none runs; TransientError on a timeout."""
    from tpenv.errors import TransientError

    stopped = []
    for s in _pick(settings.session.state_dir, session_id):
        if not await request_down(s, wait=wait):
            raise TransientError(f"session {s.id} (pid {s.pid}) did not stop within {wait:.0f}s",
                                 hint=f"kill {s.pid} stops it; its handlers die with it")
        stopped.append(s.id)
    return stopped


async def run_status(settings: Settings, *, session_id: str | None = None) -> list[dict[str, Any]]:
    """Status of every running session: ``[{"session": {...}, "units": [...], "config_error": ...}]``."""
    return [await request_status(s) for s in _pick(settings.session.state_dir, session_id)]


def format_status(replies: list[dict[str, Any]], now: float | None = None) -> str:
    """The text form of ``run_status``'s result, one line per unit."""
    now = time.time() if now is None else now
    out = []
    for r in replies:
        s = r["session"]
        out.append(f"session {s['id']} (pid {s['pid']}) {s.get('config') or ''}".rstrip())
        if r.get("config_error"):
            out.append("  config not applied (the previous one runs):")
            out.extend("    " + line for line in str(r["config_error"]).splitlines())
        for u in r["units"]:
            age = max(0, int(now - u["since"]))
            line = f"  {u['name']:<40} {u['state']:<9} {age_text(age):>6}"
            if u.get("context"):
                line += f"  context {u['context']}"
            if u.get("restarts"):
                line += f"  restarts {u['restarts']}"
            if u.get("detail"):
                line += f"  ({u['detail']})"
            if u.get("last_error"):
                line += f"  last error: {u['last_error']}"
            out.append(line)
        if not r["units"]:
            out.append("  no units")
        if r.get("connection"):
            out.extend("  " + line for line in connection_lines(r["connection"]))
        for ic in r.get("intercepts") or []:  # the mode of each intercept; a mirror's copy counters
            line = f"  intercept {ic.get('name')}: {ic.get('mode') or 'intercept'}"
            if ic.get("mode") == "mirror":
                m = ic.get("mirror") or {}
                line += f", copies sent {m.get('sent', 0)}, dropped {m.get('dropped', 0)}"
            out.append(line)
    return "\n".join(out)


def connection_lines(c: dict[str, Any]) -> list[str]:
    """The connection section of ``tpenv status`` (outbound/unit.py's snapshot), for people."""
    rtt = c.get("relay_round_trip_ms")
    lines = [f"connection: context {c.get('context') or '(current)'}, namespace {c.get('namespace')}, "
             f"mode {c.get('mode')}" + (f" ({c['why']})" if c.get("why") else "")]
    for label, key in (("mapped namespaces", "mapped_namespaces"), ("proxied", "cidrs"),
                       ("DNS suffixes", "dns_suffixes"), ("cluster DNS", "cluster_dns")):
        if c.get(key):
            lines.append(f"  {label}: {', '.join(c[key])}")
    for label, key in (("resolver", "resolver"), ("proxy", "proxy"), ("relay pod", "relay_pod")):
        if c.get(key):
            lines.append(f"  {label}: {c[key]}")
    lines.append(f"  relay round trip: {rtt} ms" if rtt is not None else
                 f"  relay round trip: unavailable ({c.get('relay_error', 'not connected')})")
    lines.extend(f"  warning: {w}" for w in c.get("warnings") or [])
    return lines


def age_text(seconds: float) -> str:
    """``95`` -> ``95s``, ``600`` -> ``10m``, ``9000`` -> ``2h`` (status and the live view)."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"
