"""tpenv schema: print the JSON Schema of telepresence.yaml (for editors and CI)."""
from __future__ import annotations

import argparse

from tpenv.cli.context import dump
from tpenv.config.schema import config_schema, schema_text

HELP = "Print the JSON Schema of telepresence.yaml (point your editor at it)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


async def run(args: argparse.Namespace, ctx) -> int:
    text = dump(config_schema(), "yaml") if ctx.output == "yaml" else schema_text()
    (ctx.stdout or __import__("sys").stdout).write(text)
    return 0
