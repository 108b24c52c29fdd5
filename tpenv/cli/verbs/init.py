"""tpenv init: stub until issue 5 replaces this file."""
from __future__ import annotations

import argparse

from tpenv.errors import NotBuiltYet

HELP = "Write a starter telepresence.yaml for a workload in the cluster (never overwrites)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", metavar="WORKLOAD",
                        help="NAME, deployment/NAME, statefulset/NAME or replicaset/NAME")
    parser.add_argument("--port", metavar="L[:R]", help="local port and service port (default: from the workload)")


async def run(args: argparse.Namespace, ctx) -> int:
    raise NotBuiltYet("tpenv init is not built yet (issue 5)")
