"""tpenv quit: stub until a later issue replaces this file."""
from __future__ import annotations

import argparse

from tpenv.errors import NotBuiltYet

HELP = "Disconnect: undo connect."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


async def run(args: argparse.Namespace, ctx) -> int:
    raise NotBuiltYet("tpenv quit is not built yet (a later issue)")
