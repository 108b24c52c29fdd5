"""tpenv up: stub until issue 6 replaces this file."""
from __future__ import annotations

import argparse

from tpenv.errors import NotBuiltYet

HELP = "Bring up everything telepresence.yaml declares and keep it up until Ctrl-C."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", metavar="NAME", default=[],
                        help="only this intercept or forward (repeatable)")


async def run(args: argparse.Namespace, ctx) -> int:
    raise NotBuiltYet("tpenv up is not built yet (issue 6)")
