"""tpenv quit: end the background `tpenv connect` session(s); says "Disconnected"."""
from __future__ import annotations

import argparse

HELP = "Disconnect: undo connect."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


async def run(args: argparse.Namespace, ctx) -> int:
    from tpenv.engine.outbound.session import SESSION_PREFIX
    from tpenv.engine.statusd import find_sessions, request_down
    from tpenv.errors import TransientError

    stopped = []
    for s in find_sessions(ctx.settings.session.state_dir):
        if s.id.startswith(SESSION_PREFIX):
            if not await request_down(s, wait=60):
                raise TransientError(f"connect session {s.id} (pid {s.pid}) did not stop within 60s",
                                     hint=f"kill {s.pid} ends it")
            stopped.append(s.id)
    lines = ["Disconnected" if stopped else "Disconnected (no connect session was running)"]
    removed = _sweep(lines)
    ctx.emit("\n".join(lines), {"disconnected": stopped, "removed": removed})
    return 0


def _sweep(lines: list[str]) -> list[str]:
    """What an earlier host-mode connect left on this machine (only after a crash: the kernel
    removes an owned table with its process), removed now; said either way."""
    import os

    from tpenv.errors import Conflict, TpenvError

    if os.geteuid() != 0:
        return []  # nothing of the host capture can exist without root
    from tpenv.kits.capture_host import sweep

    try:
        removed = sweep()
    except Conflict as e:
        lines.append(f"not swept: {e}")
        return []
    except TpenvError as e:  # no nftables on this machine: then nothing of it was left either
        lines.append(f"nothing was left behind ({e})")
        return []
    lines.append(f"removed what an earlier connect left: {', '.join(removed)}" if removed
                 else "nothing was left behind")
    return removed
