"""tpenv leave: end an intercept held by a running session on this machine.

The session (a `tpenv intercept` process) is asked to stop through its status socket: it
leaves on every replica's agent (traffic goes back to the app at once), unmounts the volumes
and exits. The agent stays installed, in passthrough, so the next intercept needs no rollout.

``--force`` ends an intercept held by anyone (another machine, another user): the agents of
the namespace are asked directly, and they agree only when the cluster says you may ``force``
``intercepts.tpenv.io`` there (tpenv.engine.forceleave). NAME is then the intercept id that
``tpenv list`` prints, or its name when only one intercept has it.
"""
from __future__ import annotations

import argparse

from tpenv.engine.session import leave

HELP = "End an intercept; its workload goes back to serving all traffic."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the intercept to end (with --force: its id, as `tpenv list` shows)")
    parser.add_argument("--force", action="store_true",
                        help="end it whoever holds it (needs the RBAC verb force on intercepts.tpenv.io "
                             "in the namespace)")


async def run(args: argparse.Namespace, ctx) -> int:
    if args.force:
        return await _forced(args, ctx)
    ic = await leave(ctx.settings, args.name)
    ctx.emit(f"Intercept {args.name} ended; {ic.get('workload')} serves all its traffic again",
             {"left": args.name, "intercept": ic})
    return 0


async def _forced(args: argparse.Namespace, ctx) -> int:
    from tpenv.engine.forceleave import force_leave
    from tpenv.kits.kube import Kube

    async with await Kube.load(context=ctx.cluster_context()) as kube:
        ns = ctx.namespace or kube.namespace
        await kube.require_namespace(ns)
        ic = await force_leave(kube, ns, args.name, ctx.settings.agent.ssh_port)
    ctx.emit(f"Intercept {ic['intercept_id']} of {ic.get('owner', '?')} ended (forced) on {len(ic['pods'])} pod(s); "
             f"{ic['workload']} serves that traffic again", {"left": ic["intercept_id"], "intercept": ic})
    return 0
