"""tpenv doctor: check this machine, the cluster and the path between them; say what to fix.

Three groups, each run concurrently and every check timed: this machine (always), the cluster
(when the kubeconfig loads and the API server answers), end to end (a tunnel round trip, a DNS
lookup through the relay). ``--fix`` then repairs what is safe to repair (stale local state,
agents no session uses, Services left pointing at a port that is gone) and lists what changed.
Exit 0 when nothing failed (warnings and skips included), 1 when something did.
"""
from __future__ import annotations

import argparse
import sys
import time

from tpenv.engine.doctor import FAIL, Finding, exit_code, repair, run_check, run_checks
from tpenv.engine.doctor.cluster import api_server, cluster_checks
from tpenv.engine.doctor.leftovers import leftover_checks
from tpenv.engine.doctor.probes import probe_checks
from tpenv.engine.doctor.machine import machine_checks
from tpenv.errors import ConfigError, TpenvError
from tpenv.kits.kube import Kube

HELP = "Check this machine and the cluster for what tpenv needs, and say what to fix."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fix", action="store_true",
                        help="repair what is safe to repair (stale local state, idle agents, broken Service ports) "
                             "and list what changed")


def _namespace(ctx) -> str | None:
    """-n, else the config file's namespace when there is a readable file, else the context's."""
    if ctx.namespace:
        return ctx.namespace
    if ctx.config_file.is_file():
        try:
            return ctx.load_config().namespace
        except ConfigError:
            return None  # validate reports the file's problems; doctor checks the rest
    return None


async def _cluster(ctx, fix: bool) -> list[Finding]:
    try:
        kube = await Kube.load(context=ctx.cluster_context())
    except ConfigError as e:  # the kubeconfig's problem, not a telepresence.yaml's: no file:line here
        return [Finding("cluster/api", FAIL, "; ".join(p.message for p in e.problems), 0.0, fix=e.hint)]
    except TpenvError as e:
        return [Finding("cluster/api", FAIL, e.message, 0.0, fix=e.hint)]
    async with kube:
        timeout = ctx.settings.doctor.check_timeout
        found = [await run_check("cluster/api", lambda: api_server(kube), timeout)]
        if found[0].status == FAIL:
            return found
        ns = _namespace(ctx) or kube.namespace
        found += await run_checks(cluster_checks(kube, ns, ctx.settings) + leftover_checks(kube, ns, ctx.settings),
                                  timeout)
        found += await run_checks(probe_checks(kube, ns, ctx.settings), timeout)
        if fix:
            await repair(found)
        return found


def _text(findings: list[Finding], seconds: float, fixing: bool) -> str:
    width = max(len(f.name) for f in findings)
    lines = []
    for f in findings:
        lines.append(f"{f.status:<5} {f.name:<{width}} {f.seconds:6.2f}s  {f.detail}")
        for change in f.changed:
            lines.append(f"{'':<5} {'':<{width}} {'':>7}  changed: {change}")
        if f.fix and f.status != "ok":
            lines.append(f"{'':<5} {'':<{width}} {'':>7}  fix: {f.fix}")
    counts = {s: sum(1 for f in findings if f.status == s) for s in ("ok", "warn", "fail", "skip")}
    lines.append(f"{len(findings)} checks in {seconds:.1f}s: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if counts["fail"] and not fixing and any(f.fixable for f in findings if f.status == FAIL):
        lines.append("some of these `tpenv doctor --fix` repairs")
    return "\n".join(lines)


async def run(args: argparse.Namespace, ctx) -> int:
    start = time.monotonic()
    ctx.apply_project_agent(lambda text: print(f"tpenv: {text}", file=sys.stderr))
    findings = await run_checks(machine_checks(ctx.settings), ctx.settings.doctor.check_timeout)
    if args.fix:
        await repair(findings)
    findings += await _cluster(ctx, args.fix)
    seconds = time.monotonic() - start
    code = exit_code(findings)
    ctx.emit(_text(findings, seconds, args.fix),
             {"ok": code == 0, "seconds": round(seconds, 3), "checks": [f.as_json() for f in findings],
              "changed": [c for f in findings for c in f.changed]})
    return code
