"""tpenv status: every unit of the running session(s), its state, since when, last error."""
from __future__ import annotations

import argparse


HELP = "Show every unit of the running session, its state and last error."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--session", metavar="ID", help="only this session (default: every running one)")


async def run(args: argparse.Namespace, ctx) -> int:
    from tpenv.engine.up import format_status, run_status

    replies = await run_status(ctx.settings, session_id=args.session)
    ctx.emit(format_status(replies), {"sessions": replies})
    return 0
