"""tpenv up: keep everything telepresence.yaml declares running until Ctrl-C or `tpenv down`."""
from __future__ import annotations

import argparse

HELP = "Bring up everything telepresence.yaml declares and keep it up until Ctrl-C."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", metavar="NAME", default=[],
                        help="only this intercept (by name) or forward (by Service name); repeatable")
    parser.add_argument("--plain", action="store_true",
                        help="plain log lines even in a terminal (no live table of the units)")


async def run(args: argparse.Namespace, ctx) -> int:
    # Imported here: the engines pull in kubernetes, which every other verb need not pay for.
    from tpenv.engine.desired import UpFactory
    from tpenv.engine.up import run_up

    from tpenv.engine.liveview import LiveView

    factory = UpFactory(ctx.settings, kube_context=ctx.kube_context, only=args.only, context_by=ctx.context_by)
    # A live table when a person watches a terminal; plain lines for scripts, CI and -o json.
    view = None if ctx.output != "text" or args.plain else LiveView
    # ctx.load_config applies -n/--context to every load, including reloads after a save;
    # factory.checked finds the file's contexts: in the kubeconfig (exit 2 at start when it cannot).
    return await run_up(ctx.config_file, ctx.settings, only=args.only, unit_factory=factory,
                        load=lambda _path: factory.checked(ctx.load_config()), view=view,
                        extra_status=factory.status, env_of=factory.env_of)
