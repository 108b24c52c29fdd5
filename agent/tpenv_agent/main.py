"""``tpenv-agent ROLE ...``: one image, two roles (``sidecar``, ``manager``), and the one-shot
``init`` step (the in-pod redirect, redirect.py) that runs before the sidecar in its pod."""
from __future__ import annotations

import asyncio
import os
import sys
from typing import Any, Callable

USAGE = "usage: tpenv-agent {sidecar|manager|init|pause} [options]  (tpenv-agent ROLE --help for options)"
# The sidecar's event loop: "auto" (uvloop when importable, else asyncio's), "uvloop" (the same,
# and the fallback is a warning too) or "asyncio". uvloop's C loop and transports cut the agent's
# CPU per passthrough request by about a quarter (0.72 x locally; docs/performance.md, issue 4).
LOOP_ENV = "TPENV_AGENT_LOOP"


def choose_loop(choice: str | None = None) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str, str | None]:
    """(loop factory or None for asyncio's default, the loop's name, why uvloop is not used or None)."""
    choice = (choice if choice is not None else os.environ.get(LOOP_ENV, "auto")).strip().lower() or "auto"
    if choice == "asyncio":
        return None, "asyncio", f"{LOOP_ENV}=asyncio"
    if choice not in ("auto", "uvloop"):
        return None, "asyncio", f"{LOOP_ENV}={choice!r} is not one of auto, uvloop, asyncio"
    try:
        import uvloop
    except ImportError as e:
        return None, "asyncio", f"uvloop cannot be imported ({type(e).__name__}: {e})"
    return uvloop.new_event_loop, "uvloop", None


# glibc malloc: keep freed memory in the heap below these sizes (mallopt parameters).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_KEEP = 64 << 20
HEAP_MMAP = 4 << 20


def keep_heap() -> bool:
    """On glibc, stop malloc from giving uvloop's read buffers back to the kernel.

    uvloop reads into its own 256000-byte buffer and hands ``data_received`` a new bytes object
    copied from it, one per read. With glibc's defaults each one came from fresh pages (mmap, or
    heap trimmed on free and grown again): the kernel zeroed and faulted in every page, about one
    fault per 4 KiB moved, which made the splice's CPU per GB 1.9 x asyncio's loop (issue #13:
    "0.47 -> 0.61-0.84 s/GB"). With a fixed mmap threshold above the buffer and a high trim
    threshold, the same few chunks are reused; the cost is up to ``HEAP_KEEP`` of freed memory
    kept by the process. False where mallopt is missing (musl) or refuses."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_MMAP)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_KEEP))


# The sidecar's CPU policy: "batch" (default) or "normal" (SCHED_OTHER, the kernel's default).
SCHED_ENV = "TPENV_AGENT_SCHED"


def cpu_policy(choice: str | None = None) -> str | None:
    """Make the sidecar's threads SCHED_BATCH (those it starts later inherit it); the reason when
    it stays SCHED_OTHER, None when batch is in force.

    The agent shares its pod's CPUs with the app. Under SCHED_OTHER each segment that arrives
    wakes the agent, the woken agent preempts the app, forwards that one segment and sleeps
    again: with both on one CPU, 1.1 agent sleeps and 1.1 forced app switches per request, and
    13.4k req/s where HAProxy in its place does 23.4k (issue #13, docs/performance.md). A woken
    SCHED_BATCH task does not preempt: it runs when the app blocks (or at the next tick) and
    forwards everything that gathered meanwhile, as HAProxy's loop does by itself: 0.07 sleeps
    per request and 25.4k req/s. On an idle CPU it runs at once, as before; on a busy one a
    wake-up waits for the running task's slice at most. Unprivileged (no capability, nor a
    seccomp rule beyond the runtime's default)."""
    choice = (choice if choice is not None else os.environ.get(SCHED_ENV, "batch")).strip().lower() or "batch"
    if choice == "normal":
        return f"{SCHED_ENV}=normal"
    if choice != "batch":
        return f"{SCHED_ENV}={choice!r} is not one of batch, normal"
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as e:
        return f"sched_setscheduler refused ({type(e).__name__}: {e})"
    return None


def run_loop(coro: Any, factory: Callable[[], asyncio.AbstractEventLoop] | None) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    role, rest = argv[0], argv[1:]
    if role == "sidecar":
        from .sidecar import run_sidecar
        factory, name, why_not = choose_loop()
        keep_heap()
        sched_why_not = cpu_policy()  # before any thread starts: they inherit it
        return run_loop(run_sidecar(rest, loop=(name, why_not), sched=sched_why_not), factory)
    if role == "init":
        from .redirect import main as init_main
        return init_main(rest)
    if role == "pause":
        # Replace mode's stand-in for the app container (replace.py): holds its place (name,
        # ports, volumes) and runs nothing until the pod is stopped.
        import signal

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            signal.pause()
    if role == "manager":
        # Built separately (manager.py); the sidecar must run without it.
        try:
            from .manager import run_manager
        except ImportError:
            print("tpenv-agent manager: this build has no manager role (tpenv_agent/manager.py is missing)",
                  file=sys.stderr)
            return 3
        return asyncio.run(run_manager(rest)) or 0
    print(f"tpenv-agent: unknown role {role!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
