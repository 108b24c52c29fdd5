"""tpenv manager: stub until issue 4 replaces this file."""
from __future__ import annotations

import argparse

from tpenv.errors import NotBuiltYet

HELP = "Install, upgrade or uninstall the optional in-cluster manager (webhook, outbound relay)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("install", "upgrade", "uninstall"), help="what to do")
    parser.add_argument("--dry-run", action="store_true", help="print the manifests instead of applying them")
    parser.add_argument("--team-mode", action="store_true",
                        help="inject agents by webhook (GitOps): workloads annotated tpenv.io/inject-agent: enabled")


async def run(args: argparse.Namespace, ctx) -> int:
    raise NotBuiltYet("tpenv manager is not built yet (issue 4)")
