"""tpenv connect: this machine reaches the cluster's Services by name and its addresses (outbound).

Like Telepresence: ``tpenv connect`` connects in the background and returns ("Connected to
context X, namespace Y (URL)"), ``tpenv quit`` disconnects; ``tpenv connect -- CMD`` is
connected for one command. The mode (host, ns, env) is said with the reason it was chosen.
"""
from __future__ import annotations

import argparse
import sys

from tpenv.errors import UsageError

HELP = "Reach cluster services from this machine by name (outbound)."


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mapped-namespaces", type=_list, metavar="NS,...", default=None,
                        help="namespaces whose short service names resolve here (default: the connected one)")
    parser.add_argument("--also-proxy", action="append", type=_list, metavar="CIDR", default=[],
                        help="also send this range to the cluster (repeatable, or comma-separated)")
    parser.add_argument("--never-proxy", action="append", type=_list, metavar="CIDR", default=[],
                        help="never send this range to the cluster (repeatable, or comma-separated)")
    parser.add_argument("--allow-conflicting-subnets", action="store_true",
                        help="proxy the cluster's ranges even where they overlap a local route")
    parser.add_argument("--mode", choices=("auto", "host", "ns", "env"), default=None,
                        help="how traffic is captured (default: connect.mode of the file, else auto)")
    parser.add_argument("--foreground", action="store_true",
                        help="stay in the foreground until Ctrl-C or `tpenv quit` (no background session)")
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("command", nargs="*", metavar="-- CMD ARGS", help="run CMD connected, then disconnect")


def flags_of(args: argparse.Namespace) -> dict:
    """The connect flags given, CIDRs checked (UsageError naming the flag: nothing started)."""
    from tpenv.engine.outbound.policy import parse_cidr

    flags: dict = {}
    if args.mapped_namespaces:
        from tpenv.config.models import is_dns_label

        for ns in args.mapped_namespaces:
            if not is_dns_label(ns):
                raise UsageError(f"--mapped-namespaces {ns!r}: not a valid namespace name")
        flags["mapped_namespaces"] = args.mapped_namespaces
    for name in ("also_proxy", "never_proxy"):
        values = [v for group in getattr(args, name) for v in group]
        for v in values:
            parse_cidr(v, "--" + name.replace("_", "-"))
        if values:
            flags[name] = values
    if args.allow_conflicting_subnets:
        flags["allow_conflicting_subnets"] = True
    if args.mode:
        flags["mode"] = args.mode
    return flags


def _argv(args: argparse.Namespace, ctx) -> list[str]:
    """The flags again, for the background session."""
    out = ["-f", str(ctx.config_file)]
    if ctx.namespace:
        out += ["-n", ctx.namespace]
    if ctx.kube_context:
        out += ["--context", ctx.kube_context]
    if args.mapped_namespaces:
        out += ["--mapped-namespaces", ",".join(args.mapped_namespaces)]
    for name in ("also_proxy", "never_proxy"):
        for group in getattr(args, name):
            out += ["--" + name.replace("_", "-"), ",".join(group)]
    if args.allow_conflicting_subnets:
        out.append("--allow-conflicting-subnets")
    if args.mode:
        out += ["--mode", args.mode]
    if ctx.debug:
        out.append("--debug")
    return out


def _config(ctx):
    from tpenv.config.models import Config

    if ctx.config_file.is_file():
        return ctx.load_config()
    config = Config()
    config.namespace = ctx.namespace
    return config


def _kube_target(ctx, config) -> tuple[str | None, str | None]:
    """``(kubeconfig context, namespace)`` to connect with. In a file with ``contexts:``, the
    connection's entry (``connect.context``, else --context / TPENV_CONTEXT, else the file's
    default), found in the reader's kubeconfig, as `tpenv up` finds it; its namespace comes after
    -n, before the file's. Pure: the caller sets the namespace."""
    if not config.contexts:
        return ctx.kube_context, config.namespace
    from tpenv.engine.contexts import resolve_targets

    target = resolve_targets(config, selected=ctx.kube_context, selected_by=ctx.context_by,
                             units=[config.connect]).of(config.connect)
    return target.kube_context, (config.namespace if ctx.namespace else target.namespace or config.namespace)


async def run(args: argparse.Namespace, ctx) -> int:
    from tpenv.engine.outbound import session
    from tpenv.kits.kube import Kube

    flags = flags_of(args)
    config = _config(ctx)
    kube_context, config.namespace = _kube_target(ctx, config)
    if args.foreground and args.ready_fd is not None:  # the background session itself
        return await session.run_foreground(config, ctx.config_file.resolve(), ctx.settings, kube_context,
                                            flags, args.ready_fd)
    async with await Kube.load(context=kube_context) as kube:
        if config.namespace:
            await kube.require_namespace(config.namespace)
        await session.check_namespaces(kube, config, flags)
        if args.command:
            return await session.run_command(config, kube, flags, args.command,
                                             lambda text: print(text, file=sys.stderr, flush=True))
    if args.foreground:
        return await session.run_foreground(config, ctx.config_file.resolve(), ctx.settings, kube_context,
                                            flags, None)
    answer = await session.start_background(_argv(args, ctx), ctx.settings.session.state_dir)
    if not answer.get("ok"):
        session.raise_reported(answer)
    ctx.emit(f"Connected to context {answer['context']}, namespace {answer['namespace']} ({answer['url']})\n"
             f"mode {answer['mode']}: {answer['why']}", answer)
    return 0
