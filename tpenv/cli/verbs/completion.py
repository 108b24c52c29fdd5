"""tpenv completion: the shell completion script for bash, zsh or fish (and its helper).

    source <(tpenv completion bash)        # in ~/.bashrc
    source <(tpenv completion zsh)         # in ~/.zshrc (after compinit)
    tpenv completion fish | source         # in ~/.config/fish/config.fish

The scripts call ``tpenv completion --complete INDEX -- WORDS...`` for the candidates
(tpenv.cli.completion); they complete `kubectl-tpenv` (the kubectl plugin) the same way.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from tpenv.errors import UsageError

HELP = "Print the shell completion script for bash, zsh or fish."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", nargs="?", choices=("bash", "zsh", "fish"), help="the shell")
    parser.add_argument("--complete", type=int, metavar="INDEX", help=argparse.SUPPRESS)
    parser.add_argument("command", nargs="*", help=argparse.SUPPRESS)


async def run(args: argparse.Namespace, ctx) -> int:
    from tpenv.cli import completion

    if args.complete is not None:
        from tpenv.cli.main import build_parser

        # In a thread: the cluster lookups run their own event loop (asyncio.run), not this one.
        found = await asyncio.to_thread(completion.candidates, build_parser(), args.command, args.complete)
        sys.stdout.write("".join(f"{c}\n" for c in found))
        return 0
    if not args.shell:
        raise UsageError("say which shell: tpenv completion bash|zsh|fish",
                         hint="e.g. source <(tpenv completion bash) in ~/.bashrc")
    sys.stdout.write(completion.SCRIPTS[args.shell])
    return 0
