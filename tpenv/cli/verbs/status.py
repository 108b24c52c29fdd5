"""tpenv status: every unit of the running session(s), its state, since when, last error.

Below them, warnings about the cluster's manager and webhook in the current namespace (the
manager down, a Secret tpenv-auth missing under running agents, the serving certificate near
expiry, pods that opted in but started without the agent, the namespace not selected): the
doctor's checks cluster/manager and cluster/webhook, shown only when they warn or fail, so a
webhook failure is seen where developers look, not only in Events. A cluster that cannot be
reached adds nothing (the sessions' own units say that).
"""
from __future__ import annotations

import argparse


HELP = "Show every unit of the running session, its state and last error."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--session", metavar="ID", help="only this session (default: every running one)")


async def run(args: argparse.Namespace, ctx) -> int:
    from tpenv.engine.up import format_status, run_status

    from tpenv.errors import NotFound

    try:
        replies = await run_status(ctx.settings, session_id=args.session)
    except NotFound:
        if args.session:
            raise
        replies = None  # still worth saying what is wrong with the cluster's webhook
    warnings = await _cluster_warnings(ctx)
    text = format_status(replies) if replies is not None else "no tpenv up session is running (start one with `tpenv up`)"
    for w in warnings:
        text += f"\nwarning: {w.name}: {w.detail}" + (f"\n  fix: {w.fix}" if w.fix else "")
    ctx.emit(text, {"sessions": replies or [], "warnings": [w.as_json() for w in warnings]})
    return 0 if replies is not None else 1


async def _cluster_warnings(ctx) -> list:
    from tpenv.cli.verbs.doctor import _namespace
    from tpenv.engine.doctor.webhook import manager_warnings
    from tpenv.errors import TpenvError
    from tpenv.kits.kube import Kube

    try:
        kube = await Kube.load(context=ctx.cluster_context())
    except TpenvError:
        return []
    async with kube:
        return await manager_warnings(kube, _namespace(ctx) or kube.namespace, ctx.settings)
