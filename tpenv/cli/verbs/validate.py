"""tpenv validate: check telepresence.yaml files and report every problem at once."""
from __future__ import annotations

import argparse
from pathlib import Path

from tpenv.config import load_config
from tpenv.errors import ConfigError

HELP = "Check telepresence.yaml (or the FILEs given) and report every problem with file:line:column."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE", help="files to check (default: -f)")


async def run(args: argparse.Namespace, ctx) -> int:
    files = args.files or [ctx.config_file]
    errors: list[ConfigError] = []
    summary = []
    for file in files:
        try:
            config = load_config(file)
        except ConfigError as e:
            errors.append(e)  # keep going: one run reports every file
            continue
        names = [ic.name for ic in config.intercepts]
        summary.append({"file": str(file), "intercepts": names, "forwards": [f.service for f in config.forwards]})
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigError([p for e in errors for p in e.problems], hint=errors[0].hint)
    text = "\n".join(f"{s['file']}: ok ({len(s['intercepts'])} intercepts, {len(s['forwards'])} forwards)"
                     for s in summary)
    ctx.emit(text, {"ok": True, "files": summary})
    return 0
