"""tpenv doctor: stub until a later issue replaces this file."""
from __future__ import annotations

import argparse

from tpenv.errors import NotBuiltYet

HELP = "Check this machine and the cluster for what tpenv needs, and say what to fix."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


async def run(args: argparse.Namespace, ctx) -> int:
    raise NotBuiltYet("tpenv doctor is not built yet (a later issue)")
