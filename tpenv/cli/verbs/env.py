"""tpenv env: stub until issue 5 replaces this file."""
from __future__ import annotations

import argparse

from tpenv.errors import NotBuiltYet

HELP = "Print or write the environment of an intercept's app container."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the intercept")
    parser.add_argument("--format", choices=("docker", "sh", "json", "compose"), default="sh",
                        help="env file syntax (default: sh)")


async def run(args: argparse.Namespace, ctx) -> int:
    raise NotBuiltYet("tpenv env is not built yet (issue 5)")
