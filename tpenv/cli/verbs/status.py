"""tpenv status: stub until issue 6 replaces this file."""
from __future__ import annotations

import argparse

from tpenv.errors import NotBuiltYet

HELP = "Show every unit of the running session, its state and last error."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


async def run(args: argparse.Namespace, ctx) -> int:
    raise NotBuiltYet("tpenv status is not built yet (issue 6)")
