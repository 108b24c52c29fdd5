"""Replace mode as pure functions over plain dicts (docs/protocol.md §1.4).

    replace(workload, settings, *, session)  -> (workload', restore_patch)
    pod_replaced(pod) -> str | None

``workload`` already carries the agent in redirect mode for every TCP port of the app container
(``inject`` once per port). ``replace`` then swaps the app container for a placeholder that keeps
its name, ports, env and volumes (so named ``targetPort``s, the redirect and EndpointSlices stay
as they are) but runs ``tpenv-agent pause`` from the agent image: the app's process does not run,
so a queue consumer or a cron in it cannot compete with the laptop. Its probes and lifecycle hooks
go (they test or drive the app, which is on the laptop now).

The restore is a JSON Patch (RFC 6902) from the replaced object back to ``workload`` as it was
before the replace, guarded by a ``test`` of the replace annotation: applied by the client on
leave, or by the agent itself when its intercepts end and nobody takes them again (kill -9 of the
client), whichever comes first; the second one fails its ``test`` and changes nothing. The agent
applies it with a token of a ServiceAccount whose Role may only ``patch`` this one workload
(``templates/replace/restore-rbac.yaml.j2``), mounted into the agent container alone.

Like inject.py this runs in the agent image too, so it builds dicts, never YAML.
"""
from __future__ import annotations

import copy
import json

from .inject import AGENT_CONTAINER, ANN_RESTORE, LABEL_AGENT, InjectError, _read, _where
from .inpod import MODE_REDIRECT

ANN_REPLACE = "tpenv.io/replace"  # workload and pod template: {"session", "container"}
RESTORE_VOLUME = "tpenv-restore"
RESTORE_DIR = "/tpenv/restore"
PLACEHOLDER_DROPS = ("command", "args", "workingDir", "livenessProbe", "readinessProbe", "startupProbe",
                     "lifecycle")


def restore_names(workload_name: str) -> str:
    """The name of the restore ServiceAccount, Role, RoleBinding and Secret of one workload."""
    name = f"tpenv-restore-{workload_name}"
    if len(name) > 63:  # a Secret name may be longer, a label value may not: keep every use valid
        import hashlib

        name = f"tpenv-restore-{workload_name[:38]}-{hashlib.sha256(workload_name.encode()).hexdigest()[:10]}"
    return name


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def pod_replaced(pod: dict) -> str | None:
    """The session that replaced this pod's app (its template's annotation), or None."""
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(ANN_REPLACE)
    if not raw:
        return None
    try:
        return json.loads(raw).get("session")
    except (ValueError, AttributeError):
        return None


def replace(workload: dict, settings: dict, *, session: str, before: dict | None = None) -> tuple[dict, list]:
    """The workload with its app container replaced, and the JSON Patch that undoes it.

    ``workload``: injected in redirect mode on every app port; ``before``: the object as it was
    before that injection (default: ``workload``), which the restore patch brings back."""
    wl = copy.deepcopy(workload)
    before = copy.deepcopy(before if before is not None else workload)
    where = _where(wl)
    record = _read(wl, ANN_RESTORE)
    if record is None or record.get("mode") != MODE_REDIRECT:
        why = (record or {}).get("why") or "the agent is not injected with it"
        raise InjectError(f"cannot replace the app of {where}: replace needs the in-pod redirect, and {why}")
    if ANN_REPLACE in ((wl.get("metadata") or {}).get("annotations") or {}):
        holder = json.loads(wl["metadata"]["annotations"][ANN_REPLACE]).get("session", "?")
        raise InjectError(f"{where} is already replaced by session {holder}; leave that intercept first")
    tpl = wl["spec"]["template"]
    containers = tpl["spec"]["containers"]
    app = next((c for c in containers if c.get("name") == record["container"]), None)
    agent = next((c for c in containers if c.get("name") == AGENT_CONTAINER), None)
    if app is None or agent is None:
        raise InjectError(f"{where} lost its app or agent container since injection")
    tcp = [p for p in app.get("ports") or [] if str(p.get("protocol", "TCP")).upper() == "TCP"]
    taken = {e["app_port"] for e in record["ports"]}
    missing = [p["containerPort"] for p in tcp if p["containerPort"] not in taken]
    if missing:
        raise InjectError(f"the agent of {where} does not take port(s) {missing} of {app['name']!r}: "
                          f"inject every port before replacing")
    mark = json.dumps({"session": session, "container": app["name"]}, sort_keys=True)
    # The placeholder: same name, ports, env, volumes and user; the agent image, doing nothing.
    for key in PLACEHOLDER_DROPS:
        app.pop(key, None)
    app["image"] = settings["agent_image"]
    app["imagePullPolicy"] = settings["image_pull_policy"]
    app["command"] = ["tpenv-agent"]
    app["args"] = ["pause", "--container", record["container"]]
    # The restore right, for the agent container alone (never the app's, never the pod's SA).
    name = restore_names(wl["metadata"]["name"])
    agent["args"] = [*agent["args"], "--restore", RESTORE_DIR]
    agent.setdefault("volumeMounts", []).append({"name": RESTORE_VOLUME, "mountPath": RESTORE_DIR,
                                                 "readOnly": True})
    tpl["spec"].setdefault("volumes", []).append({"name": RESTORE_VOLUME, "secret": {"secretName": name}})
    tpl.setdefault("metadata", {}).setdefault("annotations", {})[ANN_REPLACE] = mark
    wl["metadata"].setdefault("annotations", {})[ANN_REPLACE] = mark
    return wl, restore_patch(before, wl, mark)


def restore_patch(before: dict, replaced: dict, mark: str) -> list:
    """JSON Patch from ``replaced`` back to ``before``: the pod template whole, and the few
    metadata keys tpenv wrote (every other key of the object is someone else's and stays)."""
    ops: list = [{"op": "test", "path": "/metadata/annotations/" + _pointer(ANN_REPLACE), "value": mark},
                 {"op": "replace", "path": "/spec/template", "value": copy.deepcopy(before["spec"]["template"])}]
    for field, keys in (("annotations", (ANN_REPLACE, ANN_RESTORE)), ("labels", (LABEL_AGENT,))):
        was = (before.get("metadata") or {}).get(field) or {}
        now = (replaced.get("metadata") or {}).get(field) or {}
        if not was and now and set(now) <= set(keys):
            ops.append({"op": "remove", "path": f"/metadata/{field}"})  # the map itself was ours
            continue
        for key in keys:
            path = f"/metadata/{field}/{_pointer(key)}"
            if key in was:
                ops.append({"op": "replace" if key in now else "add", "path": path, "value": was[key]})
            elif key in now:
                ops.append({"op": "remove", "path": path})
    return ops
