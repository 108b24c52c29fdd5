"""tpenv list: stub until issue 5 replaces this file."""
from __future__ import annotations

import argparse

from tpenv.errors import NotBuiltYet

HELP = "List the workloads you can intercept and the intercepts active on them."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass  # -n NS comes with the common options


async def run(args: argparse.Namespace, ctx) -> int:
    raise NotBuiltYet("tpenv list is not built yet (issue 5)")
