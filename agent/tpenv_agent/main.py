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
        return run_loop(run_sidecar(rest, loop=(name, why_not)), factory)
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
