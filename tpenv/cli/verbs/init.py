"""tpenv init: a starter telepresence.yaml for a workload that exists in the cluster.

Reads the workload and the Service selecting it, and writes (never over an existing file) a
``contexts:`` entry finding the current cluster by its API server URL (so the file works from
every developer's kubeconfig) and one intercept: the workload by kind, its namespace,
``port: LOCAL:REMOTE`` (the Service port; the local port defaults to the container port behind
it), an env file, a mount when the container has volumes, and ``run.command`` when the container's command is known. The file is validated
with the same loader `tpenv up` uses before it is kept.

The file works as written (issue #19): the env file and the mount directory sit beside it, and
``run.watch`` never walks into either (nor into any mount point); comments in the file say so.
Both must stay out of git (the env file holds the pod's secrets): the ``.gitignore`` lines
missing from the directory's ``.gitignore`` are suggested.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from tpenv.config import load_config
from tpenv.config.loader import translated_workstation_state
from tpenv.config.models import parse_port
from tpenv.engine.agents import pick_service, service_port
from tpenv.engine.contexts import entry_for
from tpenv.errors import TpenvError, UsageError
from tpenv.kits.kube import Kube
from tpenv.kits.kubeconfig import Kubeconfig

HELP = "Write a starter telepresence.yaml for a workload in the cluster (never overwrites)."

# The comments on the written file's env and mount lines: why they may sit inside the watched
# directory (run.watch leaves tpenv's own outputs out: up.tpenv_outputs), and what they hold.
ENV_COMMENT = "the pod's env, secrets included: keep it out of git; run.watch skips it (tpenv's own output)"
MOUNT_COMMENT = ("the pod's volumes (sshfs, or a copy with mount.mode: sync); "
                 "run.watch never enters it (tpenv's own output)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", metavar="WORKLOAD", nargs="?",
                        help="NAME, deployment/NAME, statefulset/NAME or replicaset/NAME")
    parser.add_argument("--from-telepresence", metavar="FILE", type=Path,
                        help="write the equivalent of this Telepresence WorkstationState manifest "
                             "(`telepresence apply -f` format) instead; no cluster needed")
    parser.add_argument("--port", metavar="L[:R]", help="local port and service port (default: from the workload)")
    parser.add_argument("--service", metavar="NAME", help="the service, when several select the workload")


def _container_port(w, sp: dict) -> int | None:
    target = sp.get("targetPort", sp["port"])
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    for c in w.containers:
        for p in c.get("ports") or []:
            if p.get("name") == target:
                return int(p["containerPort"])
    return None


def _write(path: Path, header: str, doc: dict) -> None:
    """Write ``doc`` to ``path`` (never over a file), only once it loads as telepresence.yaml."""
    yaml = YAML()
    yaml.default_flow_style = False
    buf = io.StringIO()
    buf.write(header)
    yaml.dump(doc, buf)
    tmp = path.with_name(f".{path.name}.tpenv-init")
    tmp.write_text(buf.getvalue())
    try:
        load_config(tmp)  # what we write must load: a starter that fails to validate helps nobody
    except TpenvError:
        tmp.unlink()
        raise
    try:
        os.link(tmp, path)  # atomic and refuses to replace a file created meanwhile
    except FileExistsError as e:
        raise UsageError(f"{path} appeared meanwhile; not overwritten") from e
    finally:
        tmp.unlink(missing_ok=True)


def _from_telepresence(source: Path, path: Path, ctx) -> int:
    doc, notes = translated_workstation_state(source)
    for note in notes:  # ignored fields: on stderr at their line, as `validate` and `up` say them
        logging.getLogger("tpenv.config").warning("%s", note)
    header = (f"# Written by `tpenv init --from-telepresence {source}`: the same connection and intercepts.\n"
              f"# `tpenv up` runs it (the commands as handlers, supervised).\n")
    _write(path, header, doc)
    names = ", ".join(str(ic.get("name")) for ic in doc.get("intercepts") or []) or "no intercepts"
    ctx.emit(f"wrote {path} from {source}: {names}", {"file": str(path), "config": doc})
    return 0


async def run(args: argparse.Namespace, ctx) -> int:
    path = Path(ctx.config_file)
    if path.exists():
        raise UsageError(f"{path} exists; tpenv init never overwrites a file",
                         hint="edit it, or pass -f OTHER.yaml to write another one")
    if args.from_telepresence:
        if args.workload:
            raise UsageError("give a WORKLOAD or --from-telepresence FILE, not both")
        return _from_telepresence(args.from_telepresence, path, ctx)
    if not args.workload:
        raise UsageError("say which workload: tpenv init WORKLOAD", hint="or: tpenv init --from-telepresence FILE")
    given = parse_port(args.port) if args.port else {}
    if hasattr(given, "model_dump"):
        given = given.model_dump()
    async with await Kube.load(context=ctx.kube_context) as kube:
        ns = ctx.namespace or kube.namespace
        w = await kube.get_workload(args.workload, ns)
        service = await pick_service(kube, w, args.service)
        sp = service_port(service, given.get("remote"))
    remote = sp.get("name") or sp["port"]
    local = given.get("local") or _container_port(w, sp) or 8080
    services = [service["metadata"]["name"]]
    app = w.containers[0]
    intercept = CommentedMap({"name": w.name, "workload": w.ref, "port": f"{local}:{remote}"})
    if args.service:
        intercept["service"] = services[0]
    env_file, mount_dir = f"{w.name}.env", f"{w.name}.vol"
    intercept["env"] = {"file": env_file, "format": "docker"}
    intercept.yaml_add_eol_comment(ENV_COMMENT, "env")
    if app.get("volumeMounts"):
        intercept["mount"] = f"./{mount_dir}"
        intercept.yaml_add_eol_comment(MOUNT_COMMENT, "mount")
    else:
        intercept["mount"] = False
    command = list(app.get("command") or []) + list(app.get("args") or [])
    if command:
        intercept["run"] = {"command": command}
    doc = {"apiVersion": "tpenv/v1"}
    # The cluster by its server URL, not by this machine's context name: the file is for the team.
    name, entry = entry_for(kube, Kubeconfig.read())
    doc["contexts"] = {name: entry}
    doc["namespace"] = ns
    doc["intercepts"] = [intercept]
    _write(path, f"# Written by `tpenv init {args.workload}`: {w.kind} {w.name} in namespace {ns}, Service "
                 f"{services[0]} port {remote}.\n# `tpenv up` runs it; the command is the container's, "
                 f"adjust it to run the app on this machine.\n", doc)
    ignore = _gitignore_missing(path.parent, [f"/{env_file}"] + ([f"/{mount_dir}/"] if intercept["mount"] else []))
    text = f"wrote {path}: intercept {w.name} ({w.ref}, port {local}:{remote})"
    if ignore:
        text += "\nadd to .gitignore (the env file holds secrets; the volumes are the cluster's): " + " ".join(ignore)
    ctx.emit(text, {"file": str(path), "config": doc, "gitignore": ignore})
    return 0


def _gitignore_missing(directory: Path, lines: list[str]) -> list[str]:
    """The ``lines`` a ``.gitignore`` beside the config does not have yet (as written or without
    their leading/trailing slash): a suggestion, never an edit of the user's file."""
    try:
        have = {line.strip().strip("/") for line in (directory / ".gitignore").read_text().splitlines()}
    except OSError:
        have = set()
    return [line for line in lines if line.strip("/") not in have]
