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
    text = "Disconnected" if stopped else "Disconnected (no connect session was running)"
    ctx.emit(text, {"disconnected": stopped})
    return 0
