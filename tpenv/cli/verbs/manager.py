"""tpenv manager install | upgrade | uninstall | chart: the optional in-cluster manager (webhook injection).

``chart`` writes the same objects as a Helm chart (tpenv.engine.chart, generated from the same
templates), for clusters managed with Helm: ``helm install tpenv-manager DIR``.

``--dry-run`` prints the manifests as one YAML stream for GitOps (install/upgrade) or the
objects it would delete (uninstall), touching nothing. Note that the install stream holds the
webhook's private key (Secret tpenv-manager-tls): treat it like any Secret manifest.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from tpenv.engine import manager as engine
from tpenv.errors import UsageError

HELP = "Install, upgrade or uninstall the optional in-cluster manager (webhook injection), or write its Helm chart."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("install", "upgrade", "uninstall", "chart"),
                        help="what to do (chart: write the same objects as a Helm chart, see --out)")
    parser.add_argument("--out", type=Path, default=Path("tpenv-manager-chart"), metavar="DIR",
                        help="chart: the directory to write the Helm chart into (default: ./tpenv-manager-chart)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the manifests (a YAML stream, for GitOps) instead of applying them")
    parser.add_argument("--with-private-keys", action="store_true",
                        help="--dry-run: include the webhook's TLS private key in the printed Secret (left out by "
                             "default: output that lands in logs or Git must not carry it)")
    parser.add_argument("--team-mode", action=argparse.BooleanOptionalAction, default=None,
                        help="make personal header intercepts the default for every client of this cluster "
                             "(stored in ConfigMap tpenv/tpenv-manager; install default: off, upgrade: unchanged)")
    parser.add_argument("--webhook-namespace", action="append", metavar="NS",
                        help="a namespace whose new pods the webhook may inject (repeatable; only these, and "
                             "never kube-system, kube-public, kube-node-lease or tpenv; install default: none, "
                             "upgrade: unchanged; setting manager.webhook_namespaces)")
    parser.add_argument("--relay-cidr", action="append", metavar="CIDR",
                        help="an address range the outbound relay may connect to (repeatable; default: the "
                             "cluster's pod and service ranges, read by the relay; setting manager.relay_cidrs)")


def _without_private_keys(docs: list[dict]) -> list[dict]:
    """The manifests with every Secret's private keys (``*.key``) left out, and a note saying so."""
    out = []
    for d in docs:
        if d.get("kind") == "Secret" and any(k.endswith(".key") for k in d.get("data") or {}):
            d = {**d, "data": {k: v for k, v in d["data"].items() if not k.endswith(".key")},
                 "metadata": {**d["metadata"], "annotations": {
                     **(d["metadata"].get("annotations") or {}),
                     "tpenv.io/note": "private key left out of --dry-run output; add --with-private-keys"}}}
        out.append(d)
    return out


def _names(docs: list[dict]) -> list[str]:
    return [f"{d['kind']}/{d['metadata']['name']}" for d in docs]


async def run(args: argparse.Namespace, ctx) -> int:
    if args.relay_cidr:
        try:
            ctx.settings.manager.relay_cidrs = args.relay_cidr
        except ValidationError as e:
            raise UsageError(f"--relay-cidr: {e.errors()[0]['msg']}",
                             hint="give a range like 10.96.0.0/12 (repeat the flag for several)") from e
    if args.webhook_namespace:
        try:
            ctx.settings.manager.webhook_namespaces = args.webhook_namespace
        except ValidationError as e:
            raise UsageError(f"--webhook-namespace: {e.errors()[0]['msg'].removeprefix('Value error, ')}; "
                             "nothing was changed",
                             hint="give the namespaces of your workloads, e.g. --webhook-namespace shop") from e
    if args.action == "chart":
        from tpenv.engine.chart import write_chart

        if args.out.exists() and any(args.out.iterdir()):
            raise UsageError(f"{args.out} exists and is not empty; tpenv never overwrites a chart",
                             hint="give another --out DIR, or remove it first")
        written = write_chart(args.out)
        ctx.emit(f"wrote the Helm chart into {args.out}: {', '.join(str(p.relative_to(args.out)) for p in written)}\n"
                 f"install it with: helm install tpenv-manager {args.out}", {"chart": str(args.out),
                                                                             "files": [str(p) for p in written]})
        return 0
    if args.dry_run:
        docs = engine.render_manager(ctx.settings, team_mode=bool(args.team_mode))
        if args.action == "uninstall":
            names = list(reversed(_names(docs)))
            ctx.emit("would delete:\n" + "\n".join(f"  {n}" for n in names), {"delete": names})
        else:
            if not args.with_private_keys:
                docs = _without_private_keys(docs)
            ctx.emit(engine.to_yaml_stream(docs), docs)
        return 0

    from tpenv.engine.manager_ready import wait_webhook
    from tpenv.kits.kube import Kube

    async with await Kube.load(context=ctx.cluster_context()) as kube:
        if args.action in ("install", "upgrade"):
            if args.action == "install":
                docs = await engine.install(kube, ctx.settings, team_mode=bool(args.team_mode))
            else:
                docs = await engine.upgrade(kube, ctx.settings, team_mode=args.team_mode,
                                            keep_webhook_namespaces=not args.webhook_namespace)
            # Return when a pod created now gets the agent, not when the manifests are stored.
            selected = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["webhook_namespaces"].split(",")
            selected = [n for n in selected if n]
            checked = await wait_webhook(kube, selected[0] if selected else None)
        else:
            deleted = await engine.uninstall(kube)
            text = ("deleted:\n" + "\n".join(f"  {n}" for n in deleted)) if deleted else "the manager was not installed"
            ctx.emit(text, {"deleted": deleted})
            return 0
    team = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["team_mode"] == "true"
    where = (f"pods created from now on in namespace(s) {', '.join(selected)} with the pod label "
             f"tpenv.io/inject-agent: enabled (or Telepresence's annotation "
             f"telepresence.getambassador.io/inject-traffic-agent: enabled) get the agent" if selected else
             "the webhook injects in no namespace (select some with --webhook-namespace NS)")
    ctx.emit(f"manager {args.action}ed in namespace {engine.NAMESPACE} (team mode {'on' if team else 'off'}); "
             f"{checked}: {where}",
             {"applied": _names(docs), "team_mode": team, "webhook": checked, "webhook_namespaces": selected})
    return 0
