"""tpenv leave: stub until issue 5 replaces this file."""
from __future__ import annotations

import argparse

from tpenv.errors import NotBuiltYet

HELP = "End an intercept; its workload goes back to serving all traffic."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the intercept to end")


async def run(args: argparse.Namespace, ctx) -> int:
    raise NotBuiltYet("tpenv leave is not built yet (issue 5)")
