"""tpenv uninstall: stub until issue 5 replaces this file."""
from __future__ import annotations

import argparse

from tpenv.errors import NotBuiltYet

HELP = "Remove agents from workloads, restoring them exactly as they were."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--agent", metavar="WORKLOAD", help="remove the agent from this workload")
    which.add_argument("--all-agents", action="store_true", help="remove every agent in the namespace")
    which.add_argument("--everything", action="store_true",
                       help="remove every trace of tpenv: agents, secrets, the manager")


async def run(args: argparse.Namespace, ctx) -> int:
    raise NotBuiltYet("tpenv uninstall is not built yet (issue 5)")
