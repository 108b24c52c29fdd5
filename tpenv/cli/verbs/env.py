"""tpenv env: the environment an intercept's handler gets, printed in an env-file syntax.

An intercept running on this machine (`tpenv intercept`, from the command line or a file, or
`tpenv up`) is asked through its session's status socket: the answer is exactly the env its
handler got. Otherwise, for intercept NAME of telepresence.yaml: asks the agent of a ready pod of its workload (over a
short SSH session through the port-forward) for the app container's environment, adds the
variables the app's image sets (read in the app container, tpenv.engine.appenv), the
TELEPRESENCE_ variables, applies the config's ``set`` and ``rewrite``, and prints it. The agent
must be installed already (`tpenv up` or `tpenv intercept` installs it); nothing is changed.
"""
from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

from tpenv.config.env import format_env, render_env
from tpenv.engine.agents import agent_port_name, pick_service, pod_serves, service_port
from tpenv.engine.contexts import resolve_targets
from tpenv.engine.injection import AUTH_KEYS
from tpenv.engine.session import intercept_env
from tpenv.engine.statusd import new_session_id
from tpenv.errors import NotFound
from tpenv.kits.kube import Kube, What
from tpenv_agent.inject import AUTH_SECRET

HELP = "Print or write the environment of an intercept's app container."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the intercept")
    parser.add_argument("--format", choices=("docker", "sh", "json", "compose"), default="sh",
                        help="env file syntax (default: sh)")


async def run(args: argparse.Namespace, ctx) -> int:
    # Here: every verb's module is imported to build the parser, `up` too, which must not pay
    # for asyncssh and the port-forward transports before its rollout starts (lateimports.py).
    from tpenv.engine.appenv import merge_app_env, read_app_env
    from tpenv.kits.agent_client import AgentSession
    from tpenv.kits.portforward import PodTunnel

    running = await intercept_env(ctx.settings, args.name)
    if running is not None:
        ctx.emit(format_env(running, args.format).rstrip("\n"), running)
        return 0
    if not Path(ctx.config_file).exists():
        raise NotFound(f"no running intercept named {args.name!r} on this machine, and no {ctx.config_file} "
                       f"to find it in", hint="`tpenv list` shows the running intercepts")
    config = ctx.load_config()
    found = [ic for ic in config.intercepts if ic.name == args.name]
    if not found:
        names = ", ".join(ic.name or "?" for ic in config.intercepts) or "none"
        raise NotFound(f"no running intercept named {args.name!r} on this machine, and none in {ctx.config_file} "
                       f"(intercepts: {names})")
    ic = found[0]
    target = resolve_targets(config, selected=ctx.kube_context, selected_by=ctx.context_by, units=[ic]).of(ic)
    async with await Kube.load(context=target.kube_context) as kube:
        ns = ic.namespace or target.namespace or config.namespace or kube.namespace
        w = await kube.get_workload(ic.workload, ns)
        service = await pick_service(kube, w, ic.service)
        port_name = agent_port_name(service_port(service, ic.port.remote))
        pods = sorted((p for p in await kube.ready_pods(w) if pod_serves(p, port_name)),
                      key=lambda p: p["metadata"]["name"])
        if not pods:
            raise NotFound(f"no ready pod of {w.ref} runs the tpenv agent for this port",
                           hint=f"start the intercept once (tpenv up, or tpenv intercept {ic.workload}) to install it")
        secret = await kube.call(kube.core.read_namespaced_secret, AUTH_SECRET, ns,
                                 what=What("get", "secrets", ns, AUTH_SECRET))
        material = {k: base64.b64decode(secret["data"][k]) for k in AUTH_KEYS}
        pod = pods[0]["metadata"]["name"]
        tunnel = PodTunnel(kube, ns, pod)
        session_id = new_session_id()
        try:
            async with AgentSession(session_id, ca_key=material["ca_key"], host_key_pub=material["host_key.pub"],
                                    host=pod, port=ctx.settings.agent.ssh_port, tunnel=tunnel,
                                    connect_timeout=ctx.settings.tunnels.connect_timeout,
                                    token=kube.bearer_token()) as session:
                base = dict(await session.env())
                mounts = (await session.mounts())["mounts"]
                container = session.info.get("container") or ""
        finally:
            tunnel.close()
        app = await read_app_env(kube, ns, pod, container)
        if app.why_not is not None:
            print(f"warning: {app.why_not}", file=sys.stderr)
        base = merge_app_env(base, app.env)
    base["TELEPRESENCE_CONTAINER"] = container
    base["TELEPRESENCE_MOUNTS"] = ":".join(mounts)
    env = render_env(base, ic, None, f"{session_id}:{ic.name}", namespace=ns)
    ctx.emit(format_env(env, args.format).rstrip("\n"), env)
    return 0
