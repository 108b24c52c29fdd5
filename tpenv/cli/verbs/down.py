"""tpenv down: stub until issue 6 replaces this file."""
from __future__ import annotations

import argparse

from tpenv.errors import NotBuiltYet

HELP = "Stop the running session: leave every intercept, stop every handler."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


async def run(args: argparse.Namespace, ctx) -> int:
    raise NotBuiltYet("tpenv down is not built yet (issue 6)")
