"""tpenv leave: end an intercept held by a running session on this machine.

The session (a `tpenv intercept` process) is asked to stop through its status socket: it
leaves on every replica's agent (traffic goes back to the app at once), unmounts the volumes
and exits. The agent stays installed, in passthrough, so the next intercept needs no rollout.
"""
from __future__ import annotations

import argparse

from tpenv.engine.session import leave

HELP = "End an intercept; its workload goes back to serving all traffic."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the intercept to end")


async def run(args: argparse.Namespace, ctx) -> int:
    ic = await leave(ctx.settings, args.name)
    ctx.emit(f"Intercept {args.name} ended; {ic.get('workload')} serves all its traffic again",
             {"left": args.name, "intercept": ic})
    return 0
