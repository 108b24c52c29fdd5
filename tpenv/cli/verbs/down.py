"""tpenv down: stop the running `tpenv up` session(s) from another shell."""
from __future__ import annotations

import argparse


HELP = "Stop the running session: leave every intercept, stop every handler."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--session", metavar="ID", help="only this session (default: every running one)")
    parser.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the session to finish stopping (default: 60)")


async def run(args: argparse.Namespace, ctx) -> int:
    from tpenv.engine.up import run_down

    stopped = await run_down(ctx.settings, session_id=args.session, wait=args.wait)
    ctx.emit("\n".join(f"stopped session {s}" for s in stopped), {"stopped": stopped})
    return 0
